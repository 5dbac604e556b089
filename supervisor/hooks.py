"""Extension points that cannot break what called them.

A hook that raises is logged (once per hook function, with its error; later failures
only counted) and the caller goes on: the reap count, the stop's log line and the
shutdown sequence never depend on what operations code hung off them.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Generic, ParamSpec

from supervisor import log

P = ParamSpec("P")


class Hooks(Generic[P]):
    def __init__(self, name: str) -> None:
        self.name = name
        self._fns: list[Callable[P, Any]] = []
        self.failures = 0
        self._told: set[int] = set()

    def append(self, fn: Callable[P, Any]) -> None:
        self._fns.append(fn)

    def prepend(self, fn: Callable[P, Any]) -> None:
        """Run fn before the hooks already registered."""
        self._fns.insert(0, fn)

    def __len__(self) -> int:
        return len(self._fns)

    def run(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Call every hook in order; an awaitable result is scheduled, not awaited."""
        for fn in list(self._fns):
            try:
                result = fn(*args, **kwargs)
                if asyncio.iscoroutine(result):
                    asyncio.get_running_loop().create_task(self._guard(fn, result))
            except Exception as exc:
                self._failed(fn, exc)

    async def run_async(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Call every hook in order, awaiting those that return an awaitable."""
        for fn in list(self._fns):
            try:
                result = fn(*args, **kwargs)
                if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                    await result
            except Exception as exc:
                self._failed(fn, exc)

    async def _guard(self, fn: Callable[..., Any], result: Awaitable[Any]) -> None:
        try:
            await result
        except Exception as exc:
            self._failed(fn, exc)

    def _failed(self, fn: Callable[..., Any], exc: Exception) -> None:
        self.failures += 1
        if id(fn) not in self._told:
            self._told.add(id(fn))
            log.error("hook failed; carrying on without it", hook=self.name,
                      fn=getattr(fn, "__qualname__", repr(fn)), error=repr(exc))
