"""The step thread shared by the two continuous-batching loops (LLM scheduler, image denoiser).

A replica runs its model work in one daemon thread that calls `step()` while there is work and
sleeps on an event when idle, so the replica's asyncio loop stays free for health checks and
queue metrics. Submitting threads call `_wake.set()` after queueing.
"""

from __future__ import annotations

import threading


class StepLoop:
    """`start()` runs `step()` in a daemon thread until `stop()`; subclasses define `step`."""

    thread_name = "dreamcore-step"

    def __init__(self) -> None:
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def step(self) -> bool:  # pragma: no cover - abstract
        """One iteration of model work; returns whether there was work."""
        raise NotImplementedError

    def idle_wait_s(self) -> float:
        """How long an idle loop sleeps before looking again (sweeps, expiry)."""
        return 1.0

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            if not self.step():
                self._wake.wait(timeout=self.idle_wait_s())
