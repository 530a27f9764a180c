"""Peak resident memory of a process region: sampled in a thread (CPU tensors are not seen by tracemalloc)."""

from __future__ import annotations

import threading
import time

import psutil


class PeakMemory:
    """Peak resident memory above the starting point, sampled every 5 ms; ``added_mb`` after the block."""

    def __enter__(self) -> PeakMemory:
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.added_mb = (self.peak - self.start) / 2**20
