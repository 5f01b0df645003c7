"""moto's server for the local stack: keep-alive connections, and DynamoDB requests run one at a time.

moto 5.2 applies an UpdateItem as read, modify, write without a lock, so two workers
adding themselves to a round's done set at the same moment could lose one of the adds,
and the round would never complete. DynamoDB itself applies each update atomically. This
server serialises DynamoDB requests to restore that guarantee; SQS requests, including
long polls, still run concurrently.

A round of a small job is mostly requests to this server (bench/rounds.py measures them),
and one server process runs them all under one interpreter lock, so the server's CPU time
per request bounds how fast rounds go. Three changes to moto's own server cut it:

- cheroot serves the application instead of Werkzeug's development server. Werkzeug's
  server closes the connection after every response, so each boto3 call paid for a TCP
  connect and a new server thread. cheroot keeps HTTP/1.1 connections open and hands
  requests to a fixed pool of threads.
- moto's dispatcher lists its own package folder on every request to recognise service
  names, lists the methods of the response class with ``inspect.getmembers`` on every
  request, converts the same attribute names from camel case on every SQS receive, and
  parses each DynamoDB update expression twice per request. Each of these now computes a
  given input once.
- Request lines are not logged.

Usage: python -m shared.local.moto_server PORT [PARENT_PID]  (always binds 127.0.0.1)

With ``PARENT_PID`` the server exits once that process is no longer its parent, so a
local stack whose process was killed leaves no server behind.
"""

from __future__ import annotations

import functools
import sys
import threading
from typing import Callable, Iterable

import moto.backends
import moto.core.responses
import moto.core.utils
import moto.dynamodb.parsing.expressions
import moto.sqs.models
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

from shared.local.processes import exit_when_orphaned

try:
    from cheroot import wsgi
except ImportError as error:
    raise SystemExit("the local runtime's moto server needs cheroot, which is not installed; install Baton with "
                     "its 'local' extra (pip install -e '.[local]'), as `make .venv/.installed` does") from error

# Threads that serve requests. Every lane of the local runtime occupies one for each long
# poll (up to a second), and the fault-matrix tests run 14 lanes besides the handlers' own
# requests, so the pool is sized well above that. A request that finds every thread busy
# waits for one.
SERVER_THREADS = 64


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


def _cache_module_list() -> None:
    """Make moto's per-request list of its service folders a list read once."""
    modules = tuple(moto.backends.list_of_moto_modules())
    moto.backends.list_of_moto_modules = functools.lru_cache(maxsize=1)(lambda: modules)


def _cache_name_conversions() -> None:
    """Compute moto's method lists and camel-case conversions once per input.

    Both functions depend only on their argument (a response class, an AWS name), and
    modules that imported them by name get the cached versions too.
    """
    method_names = functools.lru_cache(maxsize=None)(
        lambda clazz: tuple(moto.core.utils.method_names_from_class(clazz)))
    moto.core.responses.method_names_from_class = method_names
    to_underscores = functools.lru_cache(maxsize=4096)(moto.core.utils.camelcase_to_underscores)
    for module in (moto.core.responses, moto.sqs.models):
        module.camelcase_to_underscores = to_underscores


def _cache_update_expressions() -> None:
    """Parse each DynamoDB update expression once instead of twice per request.

    moto (5.2) parses an UpdateExpression in its response layer and again in its backend,
    and never changes the parsed tree: its validators work on a deep copy, and the
    response layer only reads it. So one tree per expression string can serve every
    request. Baton sends a handful of distinct expressions.
    """
    parser = moto.dynamodb.parsing.expressions.UpdateExpressionParser
    parser.make = staticmethod(functools.lru_cache(maxsize=256)(parser.make))


def build_app() -> Callable:
    """Return the WSGI application the server runs."""
    _cache_module_list()
    _cache_name_conversions()
    _cache_update_expressions()
    return SerialDynamoDbMiddleware(DomainDispatcherApplication(create_backend_app))


def main(argv: list[str]) -> None:
    port = int(argv[0])
    if len(argv) > 1:
        exit_when_orphaned(int(argv[1]))
    server = wsgi.Server(("127.0.0.1", port), build_app(), numthreads=SERVER_THREADS)
    # Keep every idle connection open, because each container and lane keeps a few for its clients.
    server.keep_alive_conn_limit = None
    try:
        server.start()
    finally:
        server.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
