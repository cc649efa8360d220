"""The shipped client: `liveserve client` streams a video or live source over the public API, on the
embeddable LiveStreamClient (session.py), which resumes a broken stream by itself."""

from liveserve.services.client.resume import Reconnected, ResumePolicy
from liveserve.services.client.session import ClientError, LiveStreamClient

__all__ = ["ClientError", "LiveStreamClient", "Reconnected", "ResumePolicy"]
