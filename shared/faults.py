"""Fault injection for tests: make a handler fail at a named step.

Off unless the process environment sets ``BATON_FAULTS_ENABLED=true``; a job message
cannot switch it on. ``BATON_FAULTS`` is a JSON list of rules::

    [{"step": "worker.after_write", "kind": "raise", "times": 1, "round": 2, "worker": 1}]

``step`` names a point in :mod:`shared.service`; ``kind`` is ``raise`` (an exception the
handler reports as a failed record) or ``exit`` (the process dies, as a Lambda that runs
out of memory or time would); ``times`` bounds how often the rule fires across all
processes; the remaining keys (``job_id``, ``round``, ``worker``) must all match. The
firing count is kept in files under ``BATON_FAULTS_DIR`` so it holds across processes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from shared.errors import InjectedFault

_MATCH_KEYS = ("job_id", "round", "worker")


def _enabled() -> bool:
    return os.environ.get("BATON_FAULTS_ENABLED", "").lower() == "true"


def _claim(rule_index: int, times: int) -> bool:
    """Take one of the rule's ``times`` firings; False when all are used."""
    folder = Path(os.environ.get("BATON_FAULTS_DIR", "/tmp/baton-faults"))
    folder.mkdir(parents=True, exist_ok=True)
    for firing in range(times):
        try:
            # O_EXCL makes the claim atomic across processes.
            os.close(os.open(folder / f"rule-{rule_index}-{firing}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            continue
    return False


def maybe_fail(step: str, **ids) -> None:
    """Raise or exit if an enabled rule matches ``step`` and ``ids``."""
    if not _enabled():
        return
    rules = json.loads(os.environ.get("BATON_FAULTS", "[]"))
    for index, rule in enumerate(rules):
        if rule.get("step") != step:
            continue
        if any(key in rule and rule[key] != ids.get(key) for key in _MATCH_KEYS):
            continue
        if not _claim(index, int(rule.get("times", 1))):
            continue
        if rule.get("kind", "raise") == "exit":
            os._exit(70)
        raise InjectedFault(f"injected fault at {step} ({ids})")
