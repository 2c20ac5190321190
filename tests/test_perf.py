"""Tests of the performance helpers: peak memory of a block (CPU RSS sampling, CUDA) and timing."""

from __future__ import annotations

import pytest
import torch

from sparsezoo import perf
from sparsezoo.perf import PeakMemory, process_peak_rss_mb, time_ms

N_200MB = 50_000_000  # float32 elements in 200 MB


def test_cpu_peak_sees_allocation_freed_inside_block() -> None:
    # The tensor is gone before exit, so only the sampling thread can have seen it.
    with PeakMemory("cpu") as peak:
        x = torch.ones(N_200MB)
        del x
    assert peak.peak_mb >= 150


def test_cpu_peak_sees_allocation_held_at_exit() -> None:
    with PeakMemory("cpu") as peak:
        x = torch.ones(N_200MB)
    del x
    assert peak.peak_mb >= 150
    assert peak.peak_rss_mb >= 150


@pytest.mark.skipif(perf._MALLOC_TRIM is None, reason="needs glibc's malloc_trim")
def test_cpu_peak_sees_memory_the_allocator_reuses() -> None:
    # After a few rounds glibc keeps a freed 16 MB block in its heap; reusing it inside the
    # block raises RSS only because PeakMemory handed the free heap back to the system first.
    for _ in range(3):
        x = torch.ones(4_000_000)
        del x
    with PeakMemory("cpu") as peak:
        x = torch.ones(4_000_000)
        del x
    assert peak.peak_mb >= 12


@pytest.mark.skipif(perf._MALLINFO2 is None, reason="needs glibc's mallinfo2")
def test_heap_in_use_follows_allocations() -> None:
    before = perf.heap_in_use_bytes()
    x = torch.ones(N_200MB // 4)  # 47.7 MiB: an mmapped block
    small = [torch.ones(1024) for _ in range(1000)]  # 3.9 MiB of 4 KB heap chunks
    held = perf.heap_in_use_bytes()
    del x, small
    after = perf.heap_in_use_bytes()
    assert held - before >= 51 * perf.MB
    assert held - after >= 51 * perf.MB


@pytest.mark.skipif(
    perf._MALLINFO2 is None or perf._MALLOC_TRIM is None, reason="needs glibc's mallinfo2"
)
def test_cpu_peak_counts_memory_held_not_memory_the_allocator_keeps() -> None:
    # Interleaved frees leave holes glibc keeps resident: 64 MB stays in RSS but not in use.
    with PeakMemory("cpu") as peak:
        chunks = [torch.ones(16_384) for _ in range(2048)]  # 2048 x 64 KB heap chunks
        del chunks[::2]
        x = torch.ones(16_000_000)  # 64 MB while the holes are still resident
        del x, chunks
    assert 110 <= peak.peak_mb <= 150
    assert peak.peak_rss_mb >= peak.peak_mb + 40


def test_cpu_peak_of_empty_block_is_small() -> None:
    with PeakMemory("cpu") as peak:
        pass
    assert 0 <= peak.peak_mb < 20


def test_cpu_fallback_without_proc_uses_high_water_mark(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(perf, "_STATM", tmp_path / "missing")
    with PeakMemory("cpu") as peak:
        pass
    assert peak.peak_mb == peak.peak_rss_mb == 0.0
    # Exceed every earlier peak of this process, so the high-water mark has to rise.
    n = int((process_peak_rss_mb() + 100) * perf.MB / 4)
    with PeakMemory("cpu") as peak:
        x = torch.ones(n)
    del x
    assert peak.peak_mb >= 50


def test_process_peak_rss_is_at_least_current_rss() -> None:
    current = perf._current_rss_bytes()
    assert current is not None
    assert process_peak_rss_mb() >= current / perf.MB - 1


def test_time_ms_calls_once_and_is_non_negative() -> None:
    calls = []
    elapsed = time_ms(lambda: calls.append(1), "cpu")
    assert calls == [1]
    assert elapsed >= 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_counts_allocator_bytes() -> None:
    device = torch.device("cuda")
    keep = torch.ones(N_200MB, device=device)  # memory held at entry must not count
    with PeakMemory(device) as peak:
        x = torch.ones(N_200MB // 2, device=device)
        del x
    del keep
    # The caching allocator rounds large blocks up to 2 MB multiples.
    assert peak.peak_mb == pytest.approx(N_200MB // 2 * 4 / perf.MB, abs=2)
