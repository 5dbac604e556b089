"""The worker side of the request path: the tables, the worker link, the pool, the stop ladder, the rules."""
