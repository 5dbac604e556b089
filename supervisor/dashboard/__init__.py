"""Hermes' own web dashboard served through the gateway's port (docs/dashboard.md)."""
