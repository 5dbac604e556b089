"""The `hermes` runtime: Hermes' own session code hosted in a worker, and what makes it start and run
faster and smaller there (docs/hermes.md)."""
