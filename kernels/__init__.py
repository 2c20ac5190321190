"""Functional attention ops (``sparsezoo.kernels``).

Pure functions on tensors in the [B, T, H, D] layout (batch, time, heads, head dim), one
subpackage per mechanism. Every op offers a readable ``naive`` reference (the oracle), a fast
``torch`` path for CPU and, where written, a ``triton`` path for GPUs; ``backend="auto"`` picks
triton on CUDA tensors and torch elsewhere. This package imports only torch, triton and the
standard library: it knows nothing of modules, configs or training.
"""
