"""Restart without losing a running turn: the broker hands its workers, its port and its tables to a successor."""
