"""What a client is told about an internal failure: a message and an id, the details only in the log."""

from __future__ import annotations

import logging
import re

from liveserve.services.wire.errors import internal


def test_an_internal_error_gives_the_client_an_id_and_the_log_the_traceback(caplog):
    log = logging.getLogger("liveserve.test")
    try:
        raise RuntimeError("/secret/path/model.safetensors on 10.0.0.7 broke")
    except RuntimeError as exc:
        with caplog.at_level(logging.ERROR):
            message = internal(log, "opening the session failed", exc)
    eid = re.fullmatch(r"opening the session failed \(error ([0-9a-f]{12}); the server's log has the details\)",
                       message).group(1)
    assert "/secret" not in message and "10.0.0.7" not in message
    record = caplog.records[-1]
    assert eid in record.getMessage() and record.exc_info is not None
