"""Peak memory of this process and all its descendants (Ray's GCS, raylet, workers).

Sampled from ``/proc`` in a background thread: the sum of every process's PSS
(proportional set size, ``/proc/<pid>/smaps_rollup``), so the pages of torch's
libraries that all workers share are counted once, not once per worker. Linux only.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss(root: int | None = None) -> dict[int, int]:
    """PSS in bytes of ``root`` (default: this process) and every descendant, by pid."""
    tree, todo, out = _children(), [root or os.getpid()], {}
    while todo:
        pid = todo.pop()
        out[pid] = _pss_kib(pid) * 1024
        todo.extend(tree.get(pid, []))
    return out


def tree_pss_bytes(root: int | None = None) -> int:
    """PSS of ``root`` (default: this process) and every descendant, in bytes."""
    return sum(tree_pss(root).values())


def _name(pid: int) -> str:
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(w.decode(errors="replace") for w in words if w)
    return text.rsplit("/", 1)[-1][:48] if text else "?"


class PeakMemory:
    """``with PeakMemory() as peak: ...`` then ``peak.bytes``: the highest sample seen."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s, self.bytes = interval_s, 0
        self.at_peak: dict[str, int] = {}  # process name (pid) -> PSS bytes, at the peak
        self.at_s = 0.0  # seconds from the start to the peak
        self.samples: list[tuple[float, int]] = []  # (seconds from the start, PSS bytes)
        self._started = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def _sample(self) -> None:
        sizes = tree_pss()
        self.samples.append((time.perf_counter() - self._started, sum(sizes.values())))
        if sum(sizes.values()) > self.bytes:
            self.bytes = sum(sizes.values())
            self.at_peak = {f"{_name(pid)} ({pid})": b for pid, b in sizes.items() if b}
            self.at_s = time.perf_counter() - self._started

    def breakdown(self) -> str:
        """The processes at the peak, largest first, one per line (MiB)."""
        rows = sorted(self.at_peak.items(), key=lambda kv: -kv[1])
        return "\n".join(f"  {b / 2**20:8.0f} MiB  {name}" for name, b in rows)

    def timeline(self, step_s: float = 10.0) -> str:
        """The highest sample of every ``step_s`` seconds, in GiB, on one line."""
        buckets: dict[int, int] = {}
        for t, b in self.samples:
            buckets[int(t // step_s)] = max(buckets.get(int(t // step_s), 0), b)
        return ", ".join(f"{k * step_s:.0f}s {v / 2**30:.2f}" for k, v in sorted(buckets.items()))

    def __enter__(self) -> PeakMemory:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
