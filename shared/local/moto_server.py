"""moto's server for the local stack, with DynamoDB requests run one at a time.

moto 5.2 applies an UpdateItem as read, modify, write without a lock, so two workers
adding themselves to a round's done set at the same moment could lose one of the adds,
and the round would never complete. DynamoDB itself applies each update atomically. This
server serialises DynamoDB requests to restore that guarantee; SQS requests, including
long polls, still run concurrently.

Two changes to moto's own server make each request cheaper, because a round of a small
job is mostly requests (bench/rounds.py measures them):

- moto's dispatcher lists its own package folder on every request to recognise service
  names; the list is read once instead.
- Request lines are not logged.

NOTE: Werkzeug's development server closes the connection after every response, so each
boto3 call still pays for a TCP connect and a new server thread. Its handler drains the
socket after each response, which rules out keep-alive by subclassing it.

Usage: python -m shared.local.moto_server PORT [PARENT_PID]  (always binds 127.0.0.1)

With ``PARENT_PID`` the server exits once that process is no longer its parent, so a
local stack whose process was killed leaves no server behind.
"""

from __future__ import annotations

import functools
import sys
import threading
from typing import Any, Callable, Iterable

import moto.backends
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import run_simple

from shared.local.processes import exit_when_orphaned


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


class QuietRequestHandler(MotoRequestHandler):
    """moto's request handler without Werkzeug's line per request."""

    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


def _cache_module_list() -> None:
    """Make moto's per-request list of its service folders a list read once."""
    modules = tuple(moto.backends.list_of_moto_modules())
    moto.backends.list_of_moto_modules = functools.lru_cache(maxsize=1)(lambda: modules)


def build_app() -> Callable:
    """Return the WSGI application the server runs."""
    _cache_module_list()
    return SerialDynamoDbMiddleware(DomainDispatcherApplication(create_backend_app))


def main(argv: list[str]) -> None:
    port = int(argv[0])
    if len(argv) > 1:
        exit_when_orphaned(int(argv[1]))
    run_simple("127.0.0.1", port, build_app(), threaded=True, request_handler=QuietRequestHandler)


if __name__ == "__main__":
    main(sys.argv[1:])
