"""Keep library chatter (weight-loading progress bars, load reports) out of the command-line output."""

from __future__ import annotations

import os


def quiet_library_logs() -> None:
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
