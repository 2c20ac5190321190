"""Base-2 softmax constants shared by the torch (CPU) kernels (``sparsezoo.kernels.base2``).

The torch paths score in base 2: the query (or the scaled keys) carry scale · log2(e), so
``exp2`` replaces ``exp`` and a log-sum-exp in base 2 times ln 2 is the natural one. torch's
``exp`` goes through MKL's vector math (ATen's vml.h maps it to vsExp in MKL builds; exp2 is
not mapped and runs torch's own vectorised code), which on this project's CPU machines (2-vCPU
AMD EPYC, AVX2) ran 1.0-1.3 ns per element against 0.55-0.73 for ``exp2`` (``torch.exp`` vs
``torch.exp2`` over 16k-2M fp32 elements, one thread); the relative error of exp2(x · log2 e)
against exp(x) is below 4e-6.
A gradient taken through base-2 scores carries log2(e) where the scaled operand entered the
scores; callers take it back with ``LN2``. Each conversion of an lse between the bases rounds it
once more (an ulp of its magnitude: ~2e-5 at a 250-nat score), so a kernel keeps its saved lse
in base 2 where only its own backward reads it.
"""

from __future__ import annotations

import math

LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)
