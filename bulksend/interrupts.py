"""How a run stops early, shared by every kind of run (first SIGINT drains, second cancels):

* First SIGINT, SIGTERM or SIGHUP (or ``drain()``, e.g. ``load --abort-on-fail``): the sender
  stops reading; what is in flight finishes within ``timeout_s``, then the run is cancelled.
  SIGHUP is an ssh session or terminal gone under a long run: its default, to die at once,
  would cost the requests in flight sent again by the resume.
* Second signal: cancel at once.

Either way the caller's outputs stay whole: cancellation only ever lands between writes.
The run goes inside ``scope`` (an anyio cancel scope, so the drain's deadline is the scope's
own and a cancellation from here ends the run quietly, with no other cancellation
swallowed), and ``listen`` in a task beside it::

    async with anyio.create_task_group() as tg:
        await tg.start(interrupts.listen)
        with interrupts.scope:
            await sender.run(...)
        tg.cancel_scope.cancel()
"""

from __future__ import annotations

import contextlib
import signal
from typing import Protocol

import anyio
import anyio.abc


class Stoppable(Protocol):
    def stop(self) -> None: ...


class Interrupts:
    def __init__(self, sender: Stoppable, timeout_s: float) -> None:
        self._sender = sender
        self._timeout_s = timeout_s
        self._signals = 0
        #: The run's cancel scope: a drain sets its deadline, a second signal cancels it.
        self.scope = anyio.CancelScope()
        #: A signal arrived (exit 130), as against a drain the program asked for.
        self.interrupted = False
        #: The run was asked to stop before its end, by a signal or by ``drain()``.
        self.draining = False

    async def listen(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Turn SIGINT, SIGTERM and SIGHUP into a drain, then a cancel; runs until cancelled.
        Started (``task_group.start``) once the handlers are in place, so no early signal
        falls to Python's default KeyboardInterrupt in the middle of a run."""
        with contextlib.ExitStack() as stack:
            try:
                signals = stack.enter_context(
                    anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
                )
            except (NotImplementedError, RuntimeError, ValueError):
                # Not on Windows' loop, nor outside the main thread (a shard in a worker
                # thread): there the process's owner stops the run.
                task_status.started()
                return
            task_status.started()
            async for _ in signals:
                self._on_signal()

    def _on_signal(self) -> None:
        self._signals += 1
        self.interrupted = True
        if self._signals == 1:
            self.drain()
        else:
            self.scope.cancel()

    def drain(self) -> None:
        """Stop reading; give what is in flight ``timeout_s`` to finish, then cancel."""
        if self.draining:
            return
        self.draining = True
        self._sender.stop()
        self.scope.deadline = anyio.current_time() + self._timeout_s

    @property
    def cut_off(self) -> bool:
        """Requests in flight were abandoned (the drain timed out, or a second signal)."""
        return self.scope.cancelled_caught
