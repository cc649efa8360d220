"""The shipped client: `liveserve client` streams a video or live source over the public API."""
