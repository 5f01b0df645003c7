"""Scheduled Lambda handler: fail dead-lettered jobs and re-send the messages of stalled rounds."""

from typing import Any

from shared.control import run_watchdog
from shared.errors import BatonError
from shared.handlers import get_services, logger


@logger.inject_lambda_context
def handler(event: dict, context: Any) -> dict:
    try:
        services = get_services()
    except BatonError as error:
        # A setting in the function's environment is invalid: no watchdog run can start.
        logger.error("invalid function configuration; the watchdog did not run",
                     extra={"function": "watchdog", "error": str(error)})
        raise
    counts = run_watchdog(services)
    logger.info("watchdog run", extra=counts)
    return counts
