"""hermes-supervisor: the gateway daemon (front, broker, session table, spawner)."""

from protocol import __version__

__all__ = ["__version__"]
