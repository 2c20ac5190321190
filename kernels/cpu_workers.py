"""CPU worker threads and scratch buffers shared by the fast torch paths of every kernel.

The torch (CPU) backends split their work into chunks of a few large ops and run them on a few
worker threads, each with single-threaded ops and its own reused scratch buffers; see
:func:`run_workers` and :class:`Workspace` for why.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait

import torch

__all__ = ["Workspace", "even_ranges", "run_workers", "single_threaded_ops", "worker_count"]


class Workspace:
    """One worker's scratch buffers, reused by every chunk, so the chunk loop allocates little.

    Fresh multi-MB temporaries per chunk made glibc keep freed memory in each worker thread's
    malloc arena: measured at 16k tokens, reusing buffers cut the forward+backward RSS growth
    by ~20% of the size of q.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, like: torch.Tensor, *shape: int) -> torch.Tensor:
        """A contiguous [*shape] tensor of ``like``'s dtype and device, reusing buffer ``name``."""
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[name] = like.new_empty(numel)
        return buffer[:numel].view(shape)


class _Pool:
    """The process's persistent helper threads, one job queue each, grown on demand and
    forgotten after a fork.

    Threads are kept rather than started per call: each thread's first GEMMs allocate MKL's
    per-thread packing buffers, which a fresh thread per call allocated again every time
    (measured on MoBA's fwd+bwd at 32k tokens, two workers: 21 MB more live memory at the
    backward's peak than with kept threads), and a start costs ~0.1 ms per thread. Job i of a
    call goes to helper i's own queue, so the jobs of one call always run on distinct threads
    side by side; a shared ``ThreadPoolExecutor`` starts its threads lazily and gives a job to
    whichever thread it counts idle, so which threads a call used (and when a thread started)
    depended on timing.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: list[queue.SimpleQueue] = []
        os.register_at_fork(after_in_child=self._forget)

    def submit(self, jobs: list[Callable[[], None]]) -> list[Future]:
        """Start job i on helper i (starting helpers that do not exist yet); their futures."""
        with self._lock:
            while len(self._queues) < len(jobs):
                inbox: queue.SimpleQueue = queue.SimpleQueue()
                name = f"sparsezoo-worker-{len(self._queues)}"
                threading.Thread(target=_serve, args=(inbox,), name=name, daemon=True).start()
                self._queues.append(inbox)
            inboxes = self._queues[: len(jobs)]
        futures: list[Future] = []
        for inbox, job in zip(inboxes, jobs, strict=True):
            futures.append(Future())
            inbox.put((job, futures[-1]))
        return futures

    def _forget(self) -> None:
        """In a forked child the parent's threads do not exist: start afresh on next use."""
        self._lock = threading.Lock()
        self._queues = []


def _serve(inbox: queue.SimpleQueue) -> None:
    """A helper thread's loop: run each job from its queue, drop it, settle the job's future.

    The job goes before its future is settled: its closure holds the caller's tensors (inputs,
    outputs, per-worker buffers), which a helper that kept its last job would keep alive until
    its next one (measured: an NSA fwd+bwd at 8k tokens run after a DSA one saw ~270 MB of
    DSA's tensors freed in the middle of its forward), and the caller returns as soon as the
    future is settled.
    """
    while True:
        job, future = inbox.get()
        error: BaseException | None = None
        try:
            job()
        except BaseException as exc:  # handed to the caller through the future
            error = exc
        del job
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
        del error, future


_POOL = _Pool()


# torch's thread count when the outermost single_threaded_ops scope was entered (None outside)
_scope_threads: int | None = None
# set in a thread while it runs a job of run_workers
_in_job = threading.local()


@contextlib.contextmanager
def single_threaded_ops() -> Iterator[None]:
    """Run torch ops single-threaded inside this scope; kernels still split work over
    :func:`worker_count` workers (``run_workers``).

    A decode step is a few dozen small ops: each OpenMP-parallel one wakes the other threads
    and waits at a barrier, which costs more than the op (a 64k-token DSA decode step on two
    cores: its top-k of one score row 1.03 -> 0.70 ms single-threaded). Not for use from
    several threads at once (the thread count is process-wide).
    """
    global _scope_threads
    outer, threads = _scope_threads, torch.get_num_threads()
    if outer is None:
        _scope_threads = threads
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _scope_threads = outer


def worker_count() -> int:
    """How many workers a kernel may split its work over: torch's thread count, or the count
    a :func:`single_threaded_ops` scope was entered with; 1 inside a job of ``run_workers``
    (its helpers are busy, so a nested split would only queue behind them)."""
    if getattr(_in_job, "active", False):
        return 1
    return torch.get_num_threads() if _scope_threads is None else _scope_threads


def even_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges [lo, hi) covering 0 .. n - 1, sizes differing by at most 1."""
    return list(itertools.pairwise(n * i // parts for i in range(parts + 1)))


def run_workers(jobs: list[Callable[[], None]]) -> None:
    """Run the jobs concurrently, one thread each (the caller's thread runs the first).

    The chunk loop issues thousands of small ops; OpenMP-parallel small ops pay a barrier
    each, and on a loaded machine a barrier waits for a descheduled thread (measured 4x slower
    than one thread). So every worker runs single-threaded ops and the parallelism comes from
    the workers (torch releases the GIL inside ops), kept helper threads of the process (see
    ``_Pool``). The jobs run in a :func:`single_threaded_ops` scope; the helpers are started
    inside it and keep single-threaded ops. Calling the op from several threads at once is
    therefore not supported. Every job has finished when this returns or raises (the first
    job's error, else a helper's).
    """
    # inference mode is per thread too: buffers the caller made under it are inference
    # tensors, which a helper outside it may not update in place
    inference = torch.is_inference_mode_enabled()
    with single_threaded_ops():
        futures = _POOL.submit([functools.partial(_job_call, job, inference) for job in jobs[1:]])
        try:
            _job_call(jobs[0], inference)
        finally:
            # helpers write into buffers the caller owns: none may outlive the call
            wait(futures)
        for future in futures:
            future.result()


def _job_call(job: Callable[[], None], inference: bool) -> None:
    """Call ``job`` as a job (see :func:`worker_count`) with autograd off (grad mode is per
    thread and on in fresh threads) and in inference mode when the caller was."""
    outer = getattr(_in_job, "active", False)
    _in_job.active = True
    try:
        # in this order: inference_mode(False) turns grad mode on
        with torch.inference_mode(inference), torch.no_grad():
            job()
    finally:
        _in_job.active = outer
