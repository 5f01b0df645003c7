"""The local stack's helper processes: moto's server and the handler containers.

Each runs as a plain subprocess started with :func:`python_module_command`, never through
``multiprocessing``, so none of them imports the caller's main module. Each also calls
:func:`exit_when_orphaned`, so a stack whose process was killed leaves none behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

# How often a helper checks that the process that started it is still alive.
PARENT_CHECK_SECONDS = 0.5
# Exit status of a helper whose parent is gone.
ORPHANED_EXIT_STATUS = 3

# Runs a module as __main__ after taking over the starting process's import path, so
# that the module and everything it imports resolve as they do there, whatever the
# current folder holds. This is what multiprocessing's spawn start method does too.
_BOOTSTRAP = ("import json, runpy, sys; sys.path[:] = json.loads(sys.argv.pop(1)); "
              "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)")


def python_module_command(module: str, *arguments: str) -> list[str]:
    """Return the command that runs ``python -m module arguments`` with this process's ``sys.path``.

    ``python -m`` alone would look for ``module`` in the current folder first, where a
    user's own package of the same name could shadow Baton's.
    """
    return [sys.executable, "-c", _BOOTSTRAP, json.dumps(sys.path), module, *arguments]


def exit_when_orphaned(parent_pid: int, interval_seconds: float = PARENT_CHECK_SECONDS) -> threading.Thread:
    """Start a daemon thread that ends this process once ``parent_pid`` is no longer its parent.

    A parent that is killed gets no chance to stop its helpers, and a container busy in a
    handler would not notice its closed socket until the handler returns. When the parent
    dies, the kernel gives the helper a new parent, so ``os.getppid()`` changes. The check
    costs one system call per ``interval_seconds``.
    """
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval_seconds)
        os._exit(ORPHANED_EXIT_STATUS)

    thread = threading.Thread(target=watch, name="exit-when-orphaned", daemon=True)
    thread.start()
    return thread


def stop_process(process: subprocess.Popen, timeout_seconds: float = 10) -> None:
    """Terminate ``process`` and wait for it, killing it if it has not exited after ``timeout_seconds``."""
    process.terminate()
    try:
        process.wait(timeout=timeout_seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout_seconds)
