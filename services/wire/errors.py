"""What a client is told when something inside fails: a short message and an error id, never a
traceback, a path or an internal address. The details go to the log under the same id, so an operator
can find them from what the client reports."""

from __future__ import annotations

import logging
import uuid


def error_id() -> str:
    return uuid.uuid4().hex[:12]


def internal(log: logging.Logger, what: str, exc: BaseException | None = None, detail: str = "") -> str:
    """Log `what` went wrong (with the exception's traceback, or `detail`) and return the client's message."""
    eid = error_id()
    if exc is not None:
        log.error("%s (error %s)", what, eid, exc_info=exc)
    else:
        log.error("%s (error %s): %s", what, eid, detail)
    return f"{what} (error {eid}; the server's log has the details)"
