"""Tests of sparsezoo.kernels.nsa.gated: NSA's three branches and their sigmoid gate in one op.

The fused CPU path keeps no branch output for its backward (it recomputes the compression and
window outputs a part at a time and derives the selection's delta from the mix); it must equal
the naive composition on the output, the block ids and every input gradient.
Legend: B batch, T time, N compressed tokens, HQ query heads, H KV heads, D head dim.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch

from sparsezoo.kernels.nsa import NSAKnobs, gated_branches
from sparsezoo.kernels.nsa import gated as gated_module
from sparsezoo.kernels.nsa.compression import num_compressed

NAMES = ("q", "kcmp", "vcmp", "kslc", "vslc", "kwin", "vwin", "logits")


def make_inputs(
    B: int, T: int, HQ: int, H: int, D: int, knobs: NSAKnobs, seed: int = 0
) -> list[torch.Tensor]:
    """Seeded fp32 leaves in NAMES order (requiring grad)."""
    gen = torch.Generator().manual_seed(seed)
    N = num_compressed(T, knobs.block_size, knobs.stride)
    shapes = [(B, T, HQ, D), (B, N, H, D), (B, N, H, D)] + [(B, T, H, D)] * 4 + [(B, T, HQ, 3)]
    return [torch.randn(s, generator=gen).requires_grad_() for s in shapes]


def run(
    inputs: list[torch.Tensor], knobs: NSAKnobs, backend: str, shared: bool = False
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """(y, idx, input gradients) under a seeded output gradient; ``shared`` passes the
    selection K/V as the window's too (NSA's ``kv_mode: shared``)."""
    q, kcmp, vcmp, kslc, vslc, kwin, vwin, logits = inputs
    kv_win = (kslc, vslc) if shared else (kwin, vwin)
    y, idx = gated_branches(q, kcmp, vcmp, (kslc, vslc), kv_win, logits, knobs, backend=backend)
    # drawn in fp64 for every dtype, so the fp32 run and the fp64 oracle get the same numbers
    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    grads = torch.autograd.grad(y, inputs, dy, allow_unused=True)
    return y, idx, list(grads)


def oracle(
    inputs: list[torch.Tensor], knobs: NSAKnobs, shared: bool = False
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """The naive composition in fp64 on copies of the inputs."""
    copies = [x.detach().double().requires_grad_() for x in inputs]
    return run(copies, knobs, "naive", shared)


def assert_matches(
    fast: tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]],
    ref: tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]],
    skip: tuple[str, ...] = (),
) -> None:
    """Same block ids; output and gradients within fp32 rounding of the fp64 oracle."""
    assert torch.equal(fast[1], ref[1])
    torch.testing.assert_close(fast[0], ref[0].float(), rtol=1e-4, atol=1e-5)
    for name, got, want in zip(NAMES, fast[2], ref[2], strict=True):
        if name in skip:
            continue
        assert got is not None and want is not None, name
        scale = float(want.abs().max()) + 1e-12
        err = float((got.double() - want).abs().max())
        assert err <= 2e-5 * scale, f"{name}: max error {err:.3g} at scale {scale:.3g}"


def uses_fused_path(inputs: list[torch.Tensor], knobs: NSAKnobs) -> bool:
    """Whether the torch backend takes the fused autograd Function for these inputs."""
    q, kcmp, vcmp, kslc, vslc, kwin, vwin, logits = inputs
    y, _ = gated_branches(q, kcmp, vcmp, (kslc, vslc), (kwin, vwin), logits, knobs)
    return type(y.grad_fn).__name__ == "_GatedBranchesBackward"


CASES = [
    # (B, T, HQ, H, D, knobs): odd T, GQA, l' != l, stride 16 (two offsets per backward part,
    # the tail row ending inside a part), and 201 selection blocks
    (2, 301, 4, 2, 16, NSAKnobs(16, 8, 16, 4, 16)),
    (1, 333, 8, 1, 16, NSAKnobs(32, 16, 32, 4, 40)),
    (1, 445, 2, 2, 32, NSAKnobs(16, 8, 32, 3, 24)),
    (1, 1607, 4, 1, 16, NSAKnobs(8, 4, 8, 6, 32)),
]


def several_row_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the fused backward split even these short sequences into its most row ranges."""
    monkeypatch.setattr(gated_module, "_MIN_RANGE_ROWS", 1)


@pytest.mark.parametrize("ranges", ["one", "several"])
@pytest.mark.parametrize(("B", "T", "HQ", "H", "D", "knobs"), CASES)
def test_fused_path_equals_the_naive_composition(
    B: int, T: int, HQ: int, H: int, D: int, knobs: NSAKnobs, ranges: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Output, block ids and the gradients of q, every K/V and the gate logits, with the
    backward in one row range and in several (compression rows past the first range split
    into earlier and diagonal tokens, window pieces from a range's start, the selection routed
    per range)."""
    if ranges == "several":
        several_row_ranges(monkeypatch)
        assert len(gated_module._row_ranges(B, T, knobs)) > 4
    inputs = make_inputs(B, T, HQ, H, D, knobs)
    assert uses_fused_path(inputs, knobs)
    assert_matches(run(inputs, knobs, "torch"), oracle(inputs, knobs))


def test_shared_kv_sums_both_branch_gradients() -> None:
    """With one K/V pair for selection and window (kv_mode shared) the pair's gradient is the
    sum of both branches'; the window's own (unused) inputs get none."""
    knobs = NSAKnobs(16, 8, 16, 4, 16)
    inputs = make_inputs(1, 301, 4, 1, 16, knobs)
    fast, ref = run(inputs, knobs, "torch", shared=True), oracle(inputs, knobs, shared=True)
    assert fast[2][NAMES.index("kwin")] is None and fast[2][NAMES.index("vwin")] is None
    assert_matches(fast, ref, skip=("kwin", "vwin"))


def test_nearly_closed_selection_gate_errs_only_at_the_rows_rounding() -> None:
    """The selection's delta is the mix's row dot minus the other two branches' terms, so its
    error is absolute, at fp32 rounding of the whole row: with the selection gate at
    sigmoid(-12) ≈ 6e-6 the selection K/V gradients (~1e-5 of the others) err by about 1e-7,
    fp32 rounding of the largest gradients, and every other gradient, the logits' included
    (nothing is divided by the gate), matches as usual."""
    knobs = NSAKnobs(16, 8, 16, 4, 16)
    inputs = make_inputs(1, 301, 4, 2, 16, knobs)
    with torch.no_grad():
        inputs[-1][..., 1] = -12.0
    fast, ref = run(inputs, knobs, "torch"), oracle(inputs, knobs)
    assert_matches(fast, ref, skip=("kslc", "vslc"))
    largest = max(float(g.abs().max()) for g in ref[2] if g is not None)
    for name in ("kslc", "vslc"):
        got, want = fast[2][NAMES.index(name)], ref[2][NAMES.index(name)]
        assert float(want.abs().max()) < 1e-4 * largest
        assert float((got.double() - want).abs().max()) <= 1e-6 * largest, name


@pytest.mark.parametrize("ranges", ["one", "several"])
@pytest.mark.parametrize(("B", "T"), [(1, 301), (2, 301), (1, 64)])
def test_output_projection_inside_the_op(
    B: int, T: int, ranges: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``out_weight`` W the op returns y·Wᵀ [B, T, C], fused (T 301, its projection's
    backward in chunks of 32 rows, the last partial; two batch rows, the chunks crossing from
    one to the other) and composed (T 64), and W gets its gradient, as the naive composition
    followed by the projection."""
    monkeypatch.setattr(gated_module, "_PROJECT_CHUNK_ELEMENTS", 32 * (24 + 64))
    if ranges == "several":
        several_row_ranges(monkeypatch)
    knobs = NSAKnobs(16, 8, 16, 4, 16)
    inputs = make_inputs(B, T, 4, 2, 16, knobs)
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    results = []
    for backend, dtype in (("torch", torch.float32), ("naive", torch.float64)):
        leaves = [x.detach().to(dtype).requires_grad_() for x in [*inputs, weight]]
        q, kcmp, vcmp, kslc, vslc, kwin, vwin, logits, w = leaves
        out, _ = gated_branches(
            q, kcmp, vcmp, (kslc, vslc), (kwin, vwin), logits, knobs, backend=backend,
            out_weight=w,
        )  # fmt: skip
        assert out.shape == (B, T, 24)
        gen = torch.Generator().manual_seed(1)
        grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
        results.append((out, torch.autograd.grad(out, leaves, grad)))
    (fast, fast_grads), (ref, ref_grads) = results
    torch.testing.assert_close(fast, ref.float(), rtol=1e-4, atol=1e-4)
    for name, got, want in zip((*NAMES, "out_weight"), fast_grads, ref_grads, strict=True):
        err = float((got.double() - want).abs().max())
        assert err <= 2e-5 * float(want.abs().max()), name


def test_projected_mix_buffer_becomes_its_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the projection inside the op the mix y, its gradient dY and dq share one buffer:
    the branch backwards get dY in y's own storage (the projection's backward overwrote it a
    chunk of rows at a time), a row range at a time, and q's gradient is that storage too
    (each range's dq written over dY's rows once every branch is done with them)."""
    received: list[int] = []
    compressed = gated_module.gated_compressed_backward

    def checking_compressed(dy: torch.Tensor, *args: object, **kwargs: object) -> object:
        received.append(dy.untyped_storage().data_ptr())
        return compressed(dy, *args, **kwargs)

    monkeypatch.setattr(gated_module, "gated_compressed_backward", checking_compressed)
    several_row_ranges(monkeypatch)
    # chunks of 32 rows: the 301 rows take ten chunks, the last one partial
    monkeypatch.setattr(gated_module, "_PROJECT_CHUNK_ELEMENTS", 32 * (24 + 64))
    knobs = NSAKnobs(16, 8, 16, 4, 16)
    q, kcmp, vcmp, kslc, vslc, kwin, vwin, logits = make_inputs(1, 301, 4, 1, 16, knobs)
    weight = torch.randn(24, 64, requires_grad=True)
    out, _ = gated_branches(
        q, kcmp, vcmp, (kslc, vslc), (kwin, vwin), logits, knobs, out_weight=weight
    )
    mix_ptr = out.grad_fn.mix[0].untyped_storage().data_ptr()
    (dq,) = torch.autograd.grad(out, [q], torch.randn(out.shape))
    assert len(received) > 1 and set(received) == {mix_ptr}
    assert dq.untyped_storage().data_ptr() == mix_ptr


@pytest.mark.parametrize(
    ("B", "T", "knobs", "expected"),
    [
        (1, 32768, NSAKnobs(32, 16, 64, 16, 512), 8),
        (1, 16384, NSAKnobs(32, 16, 64, 16, 512), 4),
        (2, 8192, NSAKnobs(32, 16, 64, 16, 512), 4),
        (1, 4096, NSAKnobs(32, 16, 64, 16, 512), 1),
        (1, 8200, NSAKnobs(32, 16, 64, 16, 4500), 1),
    ],
)
def test_row_ranges_cover_the_rows_at_legal_starts(
    B: int, T: int, knobs: NSAKnobs, expected: int
) -> None:
    """The backward's row ranges tile 0 .. T; past the first, each starts past the window's
    causal head at a folded row's first query (l - 1 + m·d); at most eight, of about 4096 rows
    of the batch or more (fewer where the window leaves no legal start)."""
    ranges = gated_module._row_ranges(B, T, knobs)
    assert len(ranges) == expected
    assert ranges[0][0] == 0 and ranges[-1][1] == T
    for (_, end), (start, _) in itertools.pairwise(ranges):
        assert end == start
    for start, end in ranges[1:]:
        assert start >= knobs.window and (start - knobs.block_size + 1) % knobs.stride == 0
        assert end > start


@pytest.mark.parametrize("ranges", ["one", "several"])
def test_selection_is_routed_once_per_row_range(
    ranges: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forward routes the whole sequence; a one-range backward reuses that routing, a
    several-range one routes each range (and keeps no whole-sequence routing)."""
    calls: list[int] = []
    route = gated_module._route

    def counting_route(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return route(*args, **kwargs)

    monkeypatch.setattr(gated_module, "_route", counting_route)
    if ranges == "several":
        several_row_ranges(monkeypatch)
    knobs = NSAKnobs(16, 8, 16, 4, 16)
    inputs = make_inputs(1, 301, 4, 1, 16, knobs)
    run(inputs, knobs, "torch")
    n_ranges = len(gated_module._row_ranges(1, 301, knobs))
    assert len(calls) == (1 if ranges == "one" else 1 + n_ranges)


def test_projected_backward_runs_once() -> None:
    """The projection's backward consumes the mix's buffer: a second backward through the same
    graph raises a clear error instead of using overwritten values."""
    knobs = NSAKnobs(16, 8, 16, 4, 16)
    q, kcmp, vcmp, kslc, vslc, kwin, vwin, logits = make_inputs(1, 301, 4, 1, 16, knobs)
    weight = torch.randn(24, 64, requires_grad=True)
    out, _ = gated_branches(
        q, kcmp, vcmp, (kslc, vslc), (kwin, vwin), logits, knobs, out_weight=weight
    )
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"gated_branches: .* runs once"):
        out.sum().backward()


@pytest.mark.parametrize("T", [10, 64])
def test_short_rows_compose_the_three_ops(T: int) -> None:
    """Below one compression block (T 10) and where the selection runs as one masked call
    (T 64), the torch backend composes the ops, with the same results as the oracle."""
    knobs = NSAKnobs(16, 8, 16, 4, 16)
    inputs = make_inputs(1, T, 4, 2, 16, knobs)
    assert not uses_fused_path(inputs, knobs)
    fast, ref = run(inputs, knobs, "torch"), oracle(inputs, knobs)
    skip = ("kcmp", "vcmp") if knobs.block_size > T else ()
    assert_matches(fast, ref, skip=skip)


def test_fused_backward_keeps_no_branch_output() -> None:
    """The fused Function saves q, K/V, logits, two lse and the mix: one tensor of the output's
    size besides q, where the composition keeps every branch output as well."""
    knobs = NSAKnobs(16, 8, 16, 4, 16)
    q, kcmp, vcmp, kslc, vslc, kwin, vwin, logits = make_inputs(1, 301, 4, 1, 16, knobs)
    for backend, expected in (("torch", 2), ("naive", 5)):
        sizes: list[int] = []

        def pack(t: torch.Tensor, sizes: list[int] = sizes) -> torch.Tensor:
            sizes.append(t.untyped_storage().data_ptr() if t.numel() == q.numel() else 0)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            gated_branches(
                q, kcmp, vcmp, (kslc, vslc), (kwin, vwin), logits, knobs, backend=backend
            )
        assert len({ptr for ptr in sizes if ptr}) >= expected
        if backend == "torch":
            assert len({ptr for ptr in sizes if ptr}) == expected


def test_composition_back_propagates_each_branch_after_its_gate_term(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The composed path adds each branch's gate term as soon as the branch ran, so autograd
    (newest ready node first) back-propagates window, selection and compression in turn, each
    right after its gate term made the branch output's gradient: one such gradient is alive
    at a time."""
    branch_nodes: dict[str, torch.autograd.graph.Node] = {}
    for name in ("compressed_select", "selected_attention", "sliding_window_attention"):
        op = getattr(gated_module, name)

        def traced(*args: object, op=op, name=name, **kwargs: object) -> object:
            out = op(*args, **kwargs)
            branch_nodes[name] = (out[0] if isinstance(out, tuple) else out).grad_fn
            return out

        monkeypatch.setattr(gated_module, name, traced)
    knobs = NSAKnobs(16, 8, 16, 4, 16)
    q, kcmp, vcmp, kslc, vslc, kwin, vwin, logits = make_inputs(1, 300, 4, 1, 16, knobs)
    y, _ = gated_branches(q, kcmp, vcmp, (kslc, vslc), (kwin, vwin), logits, knobs, backend="naive")
    events: list[str] = []
    seen: set[torch.autograd.graph.Node] = set()
    stack = [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name, branch in branch_nodes.items():
            if node is branch:
                node.register_hook(lambda *_, name=name: events.append(f"ran {name}"))
            elif any(child is branch for child, _ in node.next_functions):
                # the gate term consuming the branch output: it makes that output's gradient
                node.register_hook(lambda *_, name=name: events.append(f"grad {name}"))
        stack.extend(child for child, _ in node.next_functions)
    y.sum().backward()
    assert events == [
        f"{step} {name}"
        for name in ("sliding_window_attention", "selected_attention", "compressed_select")
        for step in ("grad", "ran")
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"logits": (1, 301, 4, 2)}, "logits_BTH3 must be [B, T, HQ, 3]"),
        ({"kv_slc": (1, 300, 1, 16)}, "gated_branches (kv_slc): q and k must agree"),
        ({"kwin": (1, 301, 1, 8)}, "gated_branches (kv_win): k and v shapes differ"),
        ({"window": 0}, "window must be an int >= 1, got 0"),
        ({"stride": 5}, "block_size"),
        ({"n_select": 2}, "n_select"),
        ({"out_weight": (24, 63)}, "out_weight must be [C, HQ·D] with HQ·D = 64"),
    ],
)
def test_bad_input_names_the_argument(change: dict, message: str) -> None:
    """Each bad shape or knob raises ValueError naming it."""
    fields = {"block_size": 16, "stride": 8, "select_size": 16, "n_select": 4, "window": 16}
    fields.update({k: v for k, v in change.items() if k in fields})
    knobs = NSAKnobs(**fields)
    q, kcmp, vcmp, kslc, vslc, kwin, vwin, logits = (
        torch.randn(s)
        for s in [(1, 301, 4, 16), (1, 36, 1, 16), (1, 36, 1, 16)]
        + [(1, 301, 1, 16)] * 4
        + [(1, 301, 4, 3)]
    )
    logits = torch.randn(change["logits"]) if "logits" in change else logits
    if "kv_slc" in change:
        kslc, vslc = torch.randn(change["kv_slc"]), torch.randn(change["kv_slc"])
    kwin = torch.randn(change["kwin"]) if "kwin" in change else kwin
    weight = torch.randn(change["out_weight"]) if "out_weight" in change else None
    with pytest.raises(ValueError, match=re.escape(message)):
        gated_branches(q, kcmp, vcmp, (kslc, vslc), (kwin, vwin), logits, knobs, out_weight=weight)
