"""A handler whose import waits until a gate file exists, so a test can kill its container mid-import.

The container's environment names the gate folder in ``BATON_TEST_GATE_DIR``. Each import
writes ``importing-<pid>`` there, then waits for the file ``open``. Each invocation writes
the message ids it received to ``handled-<pid>``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

GATE_DIR = Path(os.environ["BATON_TEST_GATE_DIR"])

(GATE_DIR / f"importing-{os.getpid()}").touch()
while not (GATE_DIR / "open").exists():
    time.sleep(0.05)


def handler(event: dict, context) -> dict:
    message_ids = [record["messageId"] for record in event["Records"]]
    (GATE_DIR / f"handled-{os.getpid()}").write_text(json.dumps(message_ids))
    return {"batchItemFailures": []}
