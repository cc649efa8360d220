"""What a Serve replica's log says about a request that was refused as the API intends.

Ray Serve logs every exception a replica method raises as "Request failed." with its whole traceback. An
Open refused for a reason its client is told in the status (the replica is at its admission limit, or the
session's settings do not fit the model) is not a failure of the replica: `refused` marks such an
exception, and `QuietRefusals` turns Serve's record of it into one line, which keeps the request id Serve
writes on every line of a request, so the line can be found from the client's call.
"""

from __future__ import annotations

import logging

SERVE_LOGGER = "ray.serve"  # the logger Serve's replica wrapper reports failed requests on
_MARK = "_liveserve_refusal"


def refused(exc: BaseException) -> BaseException:
    """`exc`, marked as a refusal the caller is told about (raise it as it is)."""
    setattr(exc, _MARK, True)
    return exc


class QuietRefusals(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and getattr(exc, _MARK, False):
            first = str(exc).splitlines()[0][:300] if str(exc) else ""
            record.msg, record.args = "Request refused, as its caller was told: %s: %s", (type(exc).__name__, first)
            record.exc_info, record.exc_text = None, None
        return True


def quiet_refusals() -> None:
    """Install the filter on Serve's logger in this process, once."""
    logger = logging.getLogger(SERVE_LOGGER)
    if not any(isinstance(f, QuietRefusals) for f in logger.filters):
        logger.addFilter(QuietRefusals())
