"""Running the liveserve application: the Serve config and the launcher behind `liveserve serve`."""
