"""Triton kernels of hifi_fast.

Same op names and signatures as ``hifi_fast.ops`` (the PyTorch reference). ``AVAILABLE`` says
whether Triton imports here (``UNAVAILABLE_REASON`` says why not); the dispatcher
(``hifi_fast.backends``) reads it. The launchers take CUDA tensors, or CPU tensors when Triton runs
its interpreter (``TRITON_INTERPRET=1``, for tests).
"""
try:
    import triton  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    AVAILABLE = False
    UNAVAILABLE_REASON = f"triton is not installed ({err})"
    __all__ = ["AVAILABLE", "UNAVAILABLE_REASON"]
else:
    from .head_statistics import head_grams
    from .sparse_head_grad import head_cols_grad, head_rows_grad

    AVAILABLE = True
    __all__ = ["AVAILABLE", "head_cols_grad", "head_grams", "head_rows_grad"]
