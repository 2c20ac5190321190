"""Performance measurement helpers: peak memory of a code block and synchronized wall-clock timing.

Memory on CUDA devices comes from the caching allocator's exact counters. On CPU
:class:`PeakMemory` samples, from a background thread, the bytes glibc's malloc has handed out
and not yet had back (all threads' arenas plus mmapped blocks: what torch, numpy and Python
hold), the CPU counterpart of CUDA's allocated bytes, and alongside it the resident set size
(RSS). RSS also counts freed memory the allocator keeps for reuse, which depends on which
thread freed what (worker threads have arenas of their own) and moved the same dense step's
figure by up to 50 MB between runs at 32k tokens. Sampled numbers can miss a peak shorter than
the sampling interval.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import torch

MB = 1024 * 1024
_STATM = Path("/proc/self/statm")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on other C libraries (macOS, musl)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _find_malloc_trim()


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc >= 2.33): heap statistics over all arenas."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _find_mallinfo2() -> Callable[[], _MallInfo2] | None:
    """glibc's ``mallinfo2``, or None on other C libraries and older glibc."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _find_mallinfo2()


def heap_in_use_bytes() -> int | None:
    """Bytes glibc's malloc has handed out and not had back, over every thread's arena plus
    the mmapped blocks (``uordblks + hblkhd``); None where ``mallinfo2`` is unavailable."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


def process_peak_rss_mb() -> float:
    """Peak resident set size of this process since it started, in MB (``ru_maxrss``).

    This is a whole-run high-water mark (it never goes down), suitable for run-level metrics such
    as ``perf/peak_mem_mb``, not for measuring one block of code.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return peak / MB if sys.platform == "darwin" else peak / 1024


def _current_rss_bytes() -> int | None:
    """Current RSS from ``/proc/self/statm`` (second field, in pages), None where unavailable."""
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Context manager measuring the peak memory used by the code inside it, in MB.

    On a CUDA device it resets the allocator's peak counter at entry and ``peak_mb`` is
    ``max_memory_allocated`` minus the memory allocated at entry (exact, allocator bytes). On CPU
    a daemon thread samples every ``interval_s`` seconds (plus at entry and exit) the heap bytes
    in use (:func:`heap_in_use_bytes`) and the process RSS: ``peak_mb`` is the peak heap bytes
    minus those at entry (the counterpart of the CUDA figure: memory the block's code held at
    once, whatever the allocator kept of what it freed), ``peak_rss_mb`` the peak RSS minus the
    RSS at entry (after glibc's free heap is handed back, ``malloc_trim``). Without glibc's
    ``mallinfo2`` ``peak_mb`` is the RSS figure; without ``/proc`` both fall back to the growth
    of the process high-water mark (``ru_maxrss``), non-zero only when the block exceeds every
    earlier peak of the process. CPU numbers are sampled: comparable between mechanisms
    measured the same way.
    """

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.001) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_mb: float = 0.0
        self.peak_rss_mb: float = 0.0
        self._start_bytes = 0
        self._peak_bytes = 0
        self._start_heap: int | None = None
        self._peak_heap = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fallback_start_mb = 0.0

    def __enter__(self) -> PeakMemory:
        self.peak_mb = self.peak_rss_mb = 0.0
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_bytes = torch.cuda.memory_allocated(self.device)
            return self
        if _MALLOC_TRIM is not None:
            # Memory freed before the block but still held by glibc (tensors of earlier calls)
            # would be reused without raising RSS, hiding the block's allocations: measured on
            # a dense 4k-token forward, the delta was 0 MB without this trim and 90 MB with it.
            _MALLOC_TRIM(0)
        rss = _current_rss_bytes()
        if rss is None:
            self._fallback_start_mb = process_peak_rss_mb()
            return self
        self._start_bytes = self._peak_bytes = rss
        self._start_heap = heap_in_use_bytes()
        self._peak_heap = self._start_heap or 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="PeakMemory", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._observe()

    def _observe(self) -> None:
        rss = _current_rss_bytes()
        if rss is not None and rss > self._peak_bytes:
            self._peak_bytes = rss
        if self._start_heap is not None:
            self._peak_heap = max(self._peak_heap, heap_in_use_bytes() or 0)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.device.type == "cuda":
            _sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self._start_bytes
            self.peak_mb = max(0.0, peak / MB)
        elif self._thread is None:
            self.peak_mb = self.peak_rss_mb = max(
                0.0, process_peak_rss_mb() - self._fallback_start_mb
            )
        else:
            self._stop.set()
            self._thread.join()
            self._thread = None
            # A final sample (after the join, so no race on the peak) catches memory still held
            # at exit that fell between two samples.
            self._observe()
            self.peak_rss_mb = (self._peak_bytes - self._start_bytes) / MB
            self.peak_mb = (
                self.peak_rss_mb
                if self._start_heap is None
                else (self._peak_heap - self._start_heap) / MB
            )


def time_ms(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Wall-clock milliseconds of one call of ``fn``, synchronizing CUDA before and after.

    Kernel launches on CUDA are asynchronous, so without the synchronizations the timer would
    measure launch overhead instead of the work; on CPU ``time.perf_counter`` alone is exact.
    """
    device = torch.device(device)
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1000.0


# last-level cache bytes when the system does not say (this project's CPUs: 32 MB of L3)
_DEFAULT_LLC_BYTES = 32 << 20
_EVICTION_BUFFERS: dict[torch.device, torch.Tensor] = {}


def last_level_cache_bytes(device: torch.device) -> int:
    """Size of the cache a step's data could stay in between steps: the GPU's L2, or on CPU
    the largest cache level sysfs lists for CPU 0 (32 MB when it lists none)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        if text[:-1].isdigit() and text[-1] in units:
            sizes.append(int(text[:-1]) * units[text[-1]])
    return max(sizes, default=_DEFAULT_LLC_BYTES)


def evict_caches(device: torch.device | str = "cpu") -> None:
    """Overwrite a buffer of twice the last-level cache, so the next step finds none of its
    data cached, as a decoder's layer does after the model's other layers ran.

    A decode benchmark that restores the cache right before each step would otherwise leave
    the last-copied part hot, which favours the mechanisms that read little: decode_attn at 32k
    tokens, 16 query heads on one KV head of 64 (two rounds, /tmp/sz29/evict_ab.py): NSA
    2.48-2.61 ms hot against 2.74-2.80 ms evicted, the sliding window 0.40-0.45 against
    0.47-0.50, dense 5.5-6.5 ms either way.
    """
    device = torch.device(device)
    buffer = _EVICTION_BUFFERS.get(device)
    if buffer is None:
        n = 2 * last_level_cache_bytes(device) // 4
        buffer = _EVICTION_BUFFERS[device] = torch.empty(n, dtype=torch.float32, device=device)
    buffer.fill_(1.0)
