"""How a run stops early, shared by ``send`` and ``load`` (STYLE habit 1: first SIGINT
drains, second cancels).

* First SIGINT or SIGTERM (or ``drain()``, e.g. ``load --abort-on-fail``): the sender stops
  reading; what is in flight finishes within ``timeout_s``, then the run is cancelled.
* Second SIGINT or SIGTERM: cancel at once.

Either way the caller's outputs stay whole: cancellation only ever lands between writes.
``guard(awaitable)`` runs the send and absorbs the cancellation this class caused (and no
other), so the caller goes on to flush its outputs and print its summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable
from types import TracebackType
from typing import Protocol


class Stoppable(Protocol):
    def stop(self) -> None: ...


class Interrupts:
    def __init__(self, sender: Stoppable, timeout_s: float) -> None:
        self._sender = sender
        self._timeout_s = timeout_s
        self._signals = 0
        self._draining = False
        self._cancelled = False
        self._deadline: asyncio.TimerHandle | None = None
        self._installed: list[signal.Signals] = []
        self._task: asyncio.Task[object] | None = None
        #: A signal arrived (exit 130), as against a drain the program asked for.
        self.interrupted = False

    def __enter__(self) -> Interrupts:
        self._task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            # Not on Windows' loop, nor outside the main thread: then Ctrl-C is Python's.
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self._on_signal)
                self._installed.append(sig)
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._installed:
            loop.remove_signal_handler(sig)
        if self._deadline is not None:
            self._deadline.cancel()

    def _on_signal(self) -> None:
        self._signals += 1
        self.interrupted = True
        if self._signals == 1:
            self.drain()
        else:
            self._cancel()

    def drain(self) -> None:
        """Stop reading; give what is in flight ``timeout_s`` to finish, then cancel."""
        if self._draining:
            return
        self._draining = True
        self._sender.stop()
        self._deadline = asyncio.get_running_loop().call_later(self._timeout_s, self._cancel)

    def _cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._cancelled = True
            self._task.cancel()

    async def guard(self, run: Awaitable[None]) -> None:
        """Await the run; a cancellation that came from here ends it quietly."""
        try:
            await run
        except asyncio.CancelledError:
            if not self._cancelled:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
