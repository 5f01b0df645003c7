"""moto's server for the local stack, with DynamoDB requests run one at a time.

moto 5.2 applies an UpdateItem as read, modify, write without a lock, so two workers
adding themselves to a round's done set at the same moment could lose one of the adds,
and the round would never complete. DynamoDB itself applies each update atomically. This
server serialises DynamoDB requests to restore that guarantee; SQS requests, including
long polls, still run concurrently.

Usage: python -m shared.local.moto_server PORT  (always binds 127.0.0.1)
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Callable, Iterable

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import run_simple


class SerialDynamoDbMiddleware:
    """Run DynamoDB requests (``X-Amz-Target: DynamoDB_...``) under one lock."""

    def __init__(self, app: Callable):
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if not environ.get("HTTP_X_AMZ_TARGET", "").startswith("DynamoDB"):
            return self.app(environ, start_response)
        with self.lock:
            # Consume the response inside the lock, so the update is complete on return.
            return list(self.app(environ, start_response))


def main(argv: list[str]) -> None:
    port = int(argv[0])
    app = SerialDynamoDbMiddleware(DomainDispatcherApplication(create_backend_app))
    run_simple("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main(sys.argv[1:])
