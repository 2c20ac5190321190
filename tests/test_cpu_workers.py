"""run_workers: every job runs, errors surface after all jobs end, helper threads are kept,
run single-threaded ops, and a forked child gets working helpers of its own;
single_threaded_ops and worker_count."""

from __future__ import annotations

import multiprocessing
import threading
import time
import weakref

import pytest
import torch

from sparsezoo.kernels.cpu_workers import (
    even_ranges,
    run_workers,
    single_threaded_ops,
    worker_count,
)


def _record(seen: list, i: int) -> None:
    """Note which job ran on which thread, with the thread count and grad mode it saw."""
    time.sleep(0.01)
    seen.append((i, threading.get_ident(), torch.get_num_threads(), torch.is_grad_enabled()))


def _helper_threads() -> set[int]:
    """Idents of the live sparsezoo helper threads."""
    return {t.ident for t in threading.enumerate() if t.name.startswith("sparsezoo-worker")}


def test_jobs_run_on_kept_single_threaded_helpers() -> None:
    threads = torch.get_num_threads()
    runs, alive = [], []
    for _ in range(2):
        seen: list = []
        alive.append(_helper_threads())
        run_workers([lambda i=i, seen=seen: _record(seen, i) for i in range(3)])
        runs.append(seen)
    for seen in runs:
        assert sorted(i for i, *_ in seen) == [0, 1, 2]
        assert all(n == 1 and not grad for _, _, n, grad in seen)
        assert [ident for i, ident, *_ in seen if i == 0] == [threading.get_ident()]
        assert len({ident for _, ident, *_ in seen}) == 3  # one thread per job, side by side
    # the second call ran on threads that already existed before it: none was started
    second = {ident for i, ident, *_ in runs[1] if i > 0}
    assert second and second <= alive[1] and threading.get_ident() not in second
    assert torch.get_num_threads() == threads


def test_jobs_update_inference_tensors_of_a_caller_in_inference_mode() -> None:
    """Under the caller's inference mode (evaluation) the helpers write into the buffers it
    made there in place, as the kernels' workers do; outside it they run outside it too."""
    with torch.inference_mode():
        out = torch.zeros(3)
        run_workers([lambda i=i: out[i : i + 1].add_(i + 1) for i in range(3)])
    assert out.tolist() == [1.0, 2.0, 3.0]
    modes: list[bool] = []
    run_workers([lambda: modes.append(torch.is_inference_mode_enabled())] * 2)
    assert modes == [False, False]


def test_jobs_of_a_call_run_side_by_side() -> None:
    # every job waits for all the others: only one thread per job, all at once, gets past it
    for jobs in (2, 4, 3):
        barrier = threading.Barrier(jobs, timeout=30)
        run_workers([barrier.wait] * jobs)


def test_an_error_surfaces_after_every_job_finished() -> None:
    finished = threading.Event()

    def slow() -> None:
        time.sleep(0.2)
        finished.set()

    def fail() -> None:
        raise RuntimeError("job 0 failed")

    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="job 0 failed"):
        run_workers([fail, slow])
    assert finished.is_set()
    with pytest.raises(ValueError, match="helper failed"):
        run_workers([lambda: None, lambda: (_ for _ in ()).throw(ValueError("helper failed"))])
    assert torch.get_num_threads() == threads


def test_a_finished_call_leaves_no_reference_to_its_jobs_data() -> None:
    # a helper that kept its last job would keep the tensors of the job's closure alive until
    # its next job, hiding them from the caller's memory and freeing them in a later call
    for _ in range(3):
        data = torch.ones(1000)
        ref = weakref.ref(data)
        run_workers([lambda: None, lambda d=data: d.sum()])
        del data
        assert ref() is None


def _child(queue: multiprocessing.Queue) -> None:
    """Run two jobs in a forked child and report the job ids that ran."""
    seen: list = []
    run_workers([lambda i=i: _record(seen, i) for i in range(2)])
    queue.put(sorted(i for i, *_ in seen))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork")
def test_a_forked_child_starts_its_own_helpers() -> None:
    run_workers([lambda: None, lambda: None])  # the parent's helpers exist before the fork
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == [0, 1]


def test_single_threaded_ops_keep_the_worker_budget() -> None:
    """Inside the scope ops run on one thread while kernels may still split over the count
    the outermost scope was entered with; jobs of run_workers see 1 (no nested split); the
    thread count comes back, also after an error."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        seen: list = []
        with single_threaded_ops():
            assert torch.get_num_threads() == 1 and worker_count() == 3
            with single_threaded_ops():
                assert worker_count() == 3
            assert torch.get_num_threads() == 1 and worker_count() == 3
            run_workers([lambda: seen.append(worker_count()), lambda: seen.append(worker_count())])
            assert worker_count() == 3
        assert seen == [1, 1]
        assert torch.get_num_threads() == 3 and worker_count() == 3
        with pytest.raises(RuntimeError, match="inside"), single_threaded_ops():
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 3 and worker_count() == 3
    finally:
        torch.set_num_threads(before)


def test_even_ranges_cover_everything_in_near_equal_pieces() -> None:
    assert even_ranges(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert even_ranges(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert even_ranges(7, 1) == [(0, 7)]
