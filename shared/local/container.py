"""One warm handler process of the local runtime, like one Lambda execution environment.

:class:`shared.local.runtime.LocalRuntime` starts it as
``python -m shared.local.container FD PARENT_PID`` with the runtime's import path
(:func:`shared.local.processes.python_module_command`), where ``FD`` is this process's end
of a socket pair. It is a plain subprocess and not a ``multiprocessing`` child, so it never
imports the caller's main module. A script that builds a ``LocalStack`` at module level,
without an ``if __name__ == "__main__":`` guard, therefore starts no second stack.

Messages over the socket, pickled by ``multiprocessing.connection``, in this order:

1. runtime to container: ``{"handler", "function"}``;
2. container to runtime: ``("ready", None)`` once the handler is imported;
3. per invocation, the runtime sends the event and the container replies with
   ``("ok", response)``, or ``("error", text)`` when the handler raised.

The container exits when the runtime closes its end of the socket, and within about
half a second after its parent process is gone.
"""

from __future__ import annotations

import importlib
import io
import sys
import time
import traceback
import uuid
from multiprocessing.connection import Connection

from shared import tracing
from shared.local.processes import exit_when_orphaned


class LocalContext:
    """The subset of the Lambda context object that Baton's handlers use."""

    def __init__(self, function_name: str, memory_mb: int, timeout_seconds: float):
        self.function_name = function_name
        self.function_version = "$LATEST"
        self.memory_limit_in_mb = memory_mb
        self.aws_request_id = str(uuid.uuid4())
        self.invoked_function_arn = f"arn:aws:lambda:us-east-1:123456789012:function:{function_name}"
        self.log_group_name = f"/aws/lambda/{function_name}"
        self.log_stream_name = "local"
        self._deadline = time.monotonic() + timeout_seconds

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def serve(connection: Connection) -> None:
    """Import the handler the runtime names, report ready, then run invocations until EOF."""
    config = connection.recv()
    function = config["function"]
    # Before the handler's import, which binds the service steps that tracing wraps.
    tracing.install_from_environment(function["name"])
    module_path, handler_name = config["handler"].rsplit(".", 1)
    handler = getattr(importlib.import_module(module_path.replace("/", ".")), handler_name)
    connection.send(("ready", None))

    while True:
        try:
            event = connection.recv()
        except EOFError:
            return
        started = time.monotonic()
        context = LocalContext(function["name"], function["memory_mb"], function["timeout_seconds"])
        try:
            response = handler(event, context)
            tracing.record_invocation(event, started, time.monotonic())
            connection.send(("ok", response))
        except Exception as error:  # the handler itself crashed: Lambda reports a function error
            traceback.print_exc()
            connection.send(("error", f"{type(error).__name__}: {error}"))
        # After the reply, so that writing the spans does not delay the lane.
        tracing.flush()


def main(argv: list[str]) -> None:
    descriptor, parent_pid = int(argv[0]), int(argv[1])
    # stdout and stderr are the function's log file. Line buffering writes each log line as it is made.
    for stream in (sys.stdout, sys.stderr):
        assert isinstance(stream, io.TextIOWrapper)  # as Python opens a file given as stdout or stderr
        stream.reconfigure(line_buffering=True)
    exit_when_orphaned(parent_pid)
    serve(Connection(descriptor))


if __name__ == "__main__":
    main(sys.argv[1:])
