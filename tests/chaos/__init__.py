"""Chaos suite: socket, process, input and load faults against the real gateway (see docs/reliability.md)."""
