"""One process per session: the session runtime, its agent, slash worker and poller."""
