"""hermes-supervisor: the gateway daemon, in rooms by job (docs/architecture.md): clients/, broker/, ops/,
restart/, dashboard/, commands/, and daemon.py reading top to bottom."""

from protocol import __version__

__all__ = ["__version__"]
