"""Scheduled Lambda handler: fail dead-lettered jobs and re-send the messages of stalled rounds."""

from typing import Any

from shared.control import run_watchdog
from shared.handlers import get_services, logger


@logger.inject_lambda_context
def handler(event: dict, context: Any) -> dict:
    counts = run_watchdog(get_services())
    logger.info("watchdog run", extra=counts)
    return counts
