"""moto's server for the local stack: keep-alive connections, and DynamoDB requests run one at a time.

moto 5.2 applies an UpdateItem as read, modify, write without a lock, so two workers
adding themselves to a round's done set at the same moment could lose one of the adds,
and the round would never complete. DynamoDB itself applies each update atomically. This
server serialises DynamoDB requests to restore that guarantee.

moto's ReceiveMessage has the same kind of race: two receives at the same moment can both
find a message visible and both take it, although its visibility timeout is far from over
(seen about once in 800 messages with 16 threads). The handler then sees a second receive
of a message that is still running, and records a timeout that never happened as the
job's last error. Each pass of a receive over the queue now runs under one lock; the wait
of a long poll between passes runs outside it, so long polls still run concurrently.

A round of a small job is mostly requests to this server (bench/rounds.py measures them),
and one server process runs them all under one interpreter lock, so the server's CPU time
per request bounds how fast rounds go. These changes to moto's own server cut it:

- cheroot serves the application instead of Werkzeug's development server. Werkzeug's
  server closes the connection after every response, so each boto3 call paid for a TCP
  connect and a new server thread. cheroot keeps HTTP/1.1 connections open and hands
  requests to a fixed pool of threads.
- moto's dispatcher lists its own package folder on every request to recognise service
  names, lists the methods of the response class with ``inspect.getmembers`` on every
  request, converts the same attribute names from camel case on every SQS receive, and
  parses each DynamoDB update expression twice per request. Each of these now computes a
  given input once.
- An item attribute that holds only strings, numbers, booleans and nested maps and lists
  is copied into the response as it is, where moto walks the response shape for it.
- An UpdateItem copies the expression's parsed tree from a pickle instead of deep-copying
  it, and the expression's structural checks run once per expression and attribute
  names, not on every UpdateItem.
- Request lines are not logged.

Usage: python -m shared.local.moto_server PORT [PARENT_PID]  (always binds 127.0.0.1)

With ``PARENT_PID`` the server exits once that process is no longer its parent, so a
local stack whose process was killed leaves no server behind.
"""

from __future__ import annotations

import copy
import functools
import pickle
import sys
import threading
import time
from typing import Any, Callable, Iterable

import moto.backends
import moto.core.responses
import moto.core.serialize
import moto.core.utils
import moto.dynamodb.parsing.expressions
import moto.dynamodb.parsing.validators
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


def serialized_receive(receive: Callable) -> Callable:
    """Wrap moto's ``SQSBackend.receive_message`` so that no two receives take the same message.

    Each pass over the queue (moto's own receive with no wait) runs under one lock. A long
    poll that finds nothing waits for a new message outside the lock, for at most a second
    at a time as moto does, until its wait time is over.
    """
    lock = threading.Lock()

    @functools.wraps(receive)
    def receive_message(self, queue_name, count, wait_seconds_timeout, visibility_timeout,
                        message_attribute_names=None):
        polling_end = time.time() + wait_seconds_timeout
        while True:
            with lock:
                messages = receive(self, queue_name, count, 0, visibility_timeout, message_attribute_names)
            if messages or time.time() >= polling_end:
                return messages
            self.get_queue(queue_name).wait_for_messages(1)

    return receive_message


def _serialize_sqs_receives() -> None:
    backend = moto.sqs.models.SQSBackend
    if not getattr(backend.receive_message, "__wrapped__", None):
        backend.receive_message = serialized_receive(backend.receive_message)  # type: ignore[method-assign]  # patches moto


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
    moto.core.responses.method_names_from_class = method_names  # type: ignore[assignment]  # patch: a cached copy
    to_underscores = functools.lru_cache(maxsize=4096)(moto.core.utils.camelcase_to_underscores)
    for module in (moto.core.responses, moto.sqs.models):
        module.camelcase_to_underscores = to_underscores  # type: ignore[attr-defined]  # patch of an imported name


def _cache_update_expressions() -> None:
    """Parse each DynamoDB update expression once instead of twice per request.

    moto (5.2) parses an UpdateExpression in its response layer and again in its backend,
    and never changes the parsed tree: its validators work on a deep copy, and the
    response layer only reads it. So one tree per expression string can serve every
    request. Baton sends a handful of distinct expressions.
    """
    # mypy types moto.dynamodb.parsing.expressions as a bare module, so it finds no attribute in it.
    parser = moto.dynamodb.parsing.expressions.UpdateExpressionParser  # type: ignore[attr-defined]
    parser.make = staticmethod(functools.lru_cache(maxsize=256)(parser.make))


# Distinct (expression, names, key attributes) inputs whose structural checks passed, and
# distinct expression trees kept as pickles, before each memo is cleared. Baton sends a
# handful of each.
_VALIDATION_MEMO_LIMIT = 1024


def _speed_up_update_validation() -> None:
    """Copy each update expression's tree from a pickle, and run its structural checks once.

    moto (5.2) validates every UpdateItem on a deep copy of the expression's parsed tree,
    walking the copy once per check. Two changes make that cheaper, and neither changes
    what an update does or which update is rejected:

    - The copy is unpickled from bytes pickled once per tree, which is several times
      faster than ``copy.deepcopy`` of the same tree (a tree that does not pickle is
      deep-copied as before). The tree is the one the cached parser returns for the
      expression string (see :func:`_cache_update_expressions`), so both memos key on it.
    - The first three checks (at most one clause of each kind, no overlapping paths, no
      key attribute updated) read only the tree, the ExpressionAttributeNames and the
      table's key attributes, and change nothing. Two of them rescan the whole tree at
      every nested clause, so together they cost more than the rest of the update.
      Checks that passed for an input pass again for the same input, so later requests
      with it skip them. The checks that depend on the values and on the item still run
      on every request.
    """
    validators = moto.dynamodb.parsing.validators
    structure_checks = (validators.ActionCountValidator, validators.OverlappingPathsValidator,
                        validators.UpdateHashRangeKeyValidator)
    validator_class = validators.UpdateExpressionValidator
    original_init, original_validate = validator_class.__init__, validator_class.validate
    checked: set[tuple] = set()
    pickled_trees: dict[object, bytes | None] = {}

    def copy_tree(expression):
        if expression not in pickled_trees:
            if len(pickled_trees) >= _VALIDATION_MEMO_LIMIT:
                pickled_trees.clear()
            try:
                pickled_trees[expression] = pickle.dumps(expression, pickle.HIGHEST_PROTOCOL)
            except (pickle.PicklingError, TypeError, AttributeError):
                pickled_trees[expression] = None
        data = pickled_trees[expression]
        return copy.deepcopy(expression) if data is None else pickle.loads(data)

    def init(self, expression, expression_attribute_names, expression_attribute_values, item, table):
        # moto's constructor deep-copies the tree it is given, so it gets None, and the
        # copy comes from the pickle.
        original_init(self, None, expression_attribute_names, expression_attribute_values, item, table)
        self.node_to_validate = copy_tree(expression)
        names = tuple(sorted((expression_attribute_names or {}).items()))
        self._baton_check_key = (expression, names, tuple(table.table_key_attrs))
        if self._baton_check_key in checked:
            self.processors = [processor for processor in self.processors
                               if not isinstance(processor, structure_checks)]

    def validate(self):
        node = original_validate(self)
        # Reached only when every check passed, the structural ones included.
        if len(checked) >= _VALIDATION_MEMO_LIMIT:
            checked.clear()
        checked.add(self._baton_check_key)
        return node

    validator_class.__init__ = init  # type: ignore[method-assign]  # patches moto
    validator_class.validate = validate  # type: ignore[method-assign]  # patches moto


# AttributeValue members whose wire form is the value moto stores: strings, lists of
# strings, booleans, and maps and lists of attribute values. Binary members (B, BS) are
# absent because moto stores them as bytes that the serializer base64-encodes.
_PLAIN_ATTRIBUTE_TYPES: dict[str, type[Any]] = {"S": str, "N": str, "SS": list, "NS": list, "BOOL": bool, "NULL": bool,
                                                 "M": dict, "L": list}


def _is_plain_attribute_value(value: object) -> bool:
    """Return whether ``value`` is an AttributeValue dict already in DynamoDB's JSON wire form."""
    if not isinstance(value, dict) or len(value) != 1:
        return False
    (kind, inner), = value.items()
    expected_type = _PLAIN_ATTRIBUTE_TYPES.get(kind)
    if expected_type is None or not isinstance(inner, expected_type):
        return False
    if kind in ("SS", "NS"):
        return all(isinstance(member, str) for member in inner)
    if kind == "M":
        return all(_is_plain_attribute_value(member) for member in inner.values())
    if kind == "L":
        return all(_is_plain_attribute_value(member) for member in inner)
    return True


def _copy_plain_attribute_values() -> None:
    """Serialise each DynamoDB AttributeValue that is already in wire form as it is.

    moto (5.2) serialises a response by walking botocore's output shape, and for an
    AttributeValue it looks up each of the shape's ten members in the value under several
    spellings. Items are most of a GetItem, BatchGetItem or UpdateItem response, and for a
    read of a job item this walk took about half of the server's CPU time (measured on
    a9a rounds). An AttributeValue that contains only strings, booleans, and maps and
    lists of such values serialises to the value itself, so it is copied in one step. Any
    other value, a binary one for example, takes moto's path.
    """
    serializer = moto.core.serialize.JSONSerializer
    walk_structure = serializer._serialize_type_structure

    def serialize_structure(self, serialized, value, shape, key):
        if shape.name == "AttributeValue" and _is_plain_attribute_value(value):
            self._default_serialize(serialized, value, shape, key)
            return
        walk_structure(self, serialized, value, shape, key)

    serializer._serialize_type_structure = serialize_structure  # type: ignore[method-assign]  # patches moto


def build_app() -> Callable:
    """Return the WSGI application the server runs."""
    _cache_module_list()
    _cache_name_conversions()
    _cache_update_expressions()
    _copy_plain_attribute_values()
    _speed_up_update_validation()
    _serialize_sqs_receives()
    return SerialDynamoDbMiddleware(DomainDispatcherApplication(create_backend_app))


def main(argv: list[str]) -> None:
    port = int(argv[0])
    if len(argv) > 1:
        exit_when_orphaned(int(argv[1]))
    server = wsgi.Server(("127.0.0.1", port), build_app(), numthreads=SERVER_THREADS)
    # Keep every idle connection open, because each container and lane keeps a few for its clients.
    server.keep_alive_conn_limit = None  # type: ignore[assignment]  # cheroot documents None as no limit
    try:
        server.start()
    finally:
        server.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
