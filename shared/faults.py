"""Fault injection for tests: make a handler fail at a named step, or a delivery misbehave.

Off unless the process environment sets ``BATON_FAULTS_ENABLED=true``
(:func:`shared.config.faults_enabled`). The rules come only from the environment
(``BATON_FAULTS``), never from a message, so no job spec or task can switch a fault on.
``BATON_FAULTS`` is a JSON list of rules::

    [{"step": "worker.after_write", "kind": "raise", "times": 1, "round": 2, "worker": 1}]

Step faults fire inside the steps (:mod:`shared.starter`, :mod:`shared.worker`,
:mod:`shared.aggregation`) at the points listed in :data:`STEPS`:

``raise``
    An exception that the handler reports as a failed record.
``exit``
    The process dies at once, as a Lambda that runs out of memory would.
``hang``
    The step sleeps for ``seconds`` (default one hour), so the invocation times out.

Delivery faults are applied by the local runtime's lanes (:mod:`shared.local.runtime`)
to messages of the function named by ``function``, before the handler sees them:

``duplicate``
    The record is delivered twice. With ``delay_seconds`` the copy is sent back to the
    queue instead and arrives that much later, usually after the job has moved on.
``delay``
    The first delivery is held back for ``delay_seconds``, so later messages overtake it.
``reorder``
    The lane receives up to ten messages and runs them in reverse order, one per
    invocation. While the rule has a firing left, the lane also receives the rest of
    the targeted job's round, so that the round's messages run back to front in one lane.

``times`` bounds how often a rule fires across all processes (default 1). The keys
``job_id``, ``round``, ``worker`` and ``reduce`` (a reducer's slice) must all match when
a rule gives them. Firings are
claimed with files under ``BATON_FAULTS_DIR`` so that the count holds across processes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

from shared.config import faults_enabled
from shared.errors import InjectedFault

STEPS = (
    "starter.validated",
    "starter.prepared",
    "starter.started",
    "worker.before_read",
    "worker.after_progress",
    "worker.after_write",
    "worker.after_record",
    "aggregator.before_read",
    "aggregator.after_write",
    "aggregator.after_progress",
    "aggregator.after_metrics",
    "aggregator.before_finish",
    "aggregator.after_advance",
    "reducer.before_read",
    "reducer.after_write",
    "reducer.after_record",
    "watchdog.before_resend",
)
STEP_KINDS = ("raise", "exit", "hang")
DELIVERY_KINDS = ("duplicate", "delay", "reorder")

_MATCH_KEYS = ("job_id", "round", "worker", "reduce")
# Exit status of a process killed by an injected fault, so logs can tell it apart.
EXIT_STATUS = 70


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Return whether the environment (the process's by default) switches fault injection on.

    Raises
    ------
    BatonError
        If ``BATON_FAULTS_ENABLED`` is neither true nor false, naming the value.
    """
    return faults_enabled(environ)


def load_rules(environ: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Return the rules in ``BATON_FAULTS``, or none when injection is off."""
    environ = os.environ if environ is None else environ
    if not enabled(environ):
        return []
    rules = json.loads(environ.get("BATON_FAULTS", "[]"))
    if not isinstance(rules, list):
        raise ValueError(f"BATON_FAULTS must be a JSON list of rules, got {type(rules).__name__}")
    return rules


def _claims_folder(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    return Path(environ.get("BATON_FAULTS_DIR", "/tmp/baton-faults"))


def _claim(rule_index: int, times: int, environ: Mapping[str, str] | None = None) -> bool:
    """Take one of the rule's ``times`` firings; False when all are used."""
    folder = _claims_folder(environ)
    folder.mkdir(parents=True, exist_ok=True)
    for firing in range(times):
        try:
            # O_EXCL makes the claim atomic across processes.
            os.close(os.open(folder / f"rule-{rule_index}-{firing}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            continue
    return False


def _matches(rule: dict, ids: dict) -> bool:
    return all(rule[key] == ids.get(key) for key in _MATCH_KEYS if key in rule)


def maybe_fail(step: str, **ids) -> None:
    """Raise, exit or hang if an enabled rule matches ``step`` and ``ids``."""
    for index, rule in enumerate(load_rules()):
        if rule.get("step") != step or not _matches(rule, ids):
            continue
        if not _claim(index, int(rule.get("times", 1))):
            continue
        kind = rule.get("kind", "raise")
        if kind == "exit":
            os._exit(EXIT_STATUS)
        if kind == "hang":
            time.sleep(float(rule.get("seconds", 3600)))
            return
        raise InjectedFault(f"injected fault at {step} ({ids})")


def claim_delivery_fault(function: str, ids: dict, kinds: tuple[str, ...] = DELIVERY_KINDS,
                         environ: Mapping[str, str] | None = None) -> dict | None:
    """Return the delivery rule of one of ``kinds`` that fires for a message of ``function``.

    Used by the local runtime's lanes with the containers' environment; a returned rule
    has used up one of its firings.
    """
    for index, rule in enumerate(load_rules(environ)):
        if rule.get("kind") not in kinds or rule.get("function") != function:
            continue
        if not _matches(rule, ids):
            continue
        if _claim(index, int(rule.get("times", 1)), environ):
            return rule
    return None


def pending_delivery_rule(function: str, kind: str, ids: dict, environ: Mapping[str, str] | None = None) -> bool:
    """Return whether a rule of ``kind`` for ``function`` matches ``ids`` and has a firing left.

    Unlike :func:`claim_delivery_fault`, this uses up no firing.
    """
    folder = _claims_folder(environ)
    for index, rule in enumerate(load_rules(environ)):
        if rule.get("kind") != kind or rule.get("function") != function or not _matches(rule, ids):
            continue
        if not all((folder / f"rule-{index}-{firing}").exists() for firing in range(int(rule.get("times", 1)))):
            return True
    return False


def has_delivery_rule(function: str, kind: str, environ: Mapping[str, str] | None = None) -> bool:
    """Return whether any rule of ``kind`` targets ``function``."""
    return any(rule.get("kind") == kind and rule.get("function") == function for rule in load_rules(environ))
