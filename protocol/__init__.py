"""What the broker and its workers agree on, and nothing else."""

__version__ = "0.1.0"
