"""Triton kernels of hifi_fast, installed as ``hifi_fast.kernels``.

Same op names and signatures as ``hifi_fast.ops`` (the PyTorch reference). ``AVAILABLE`` says
whether Triton imports here; the dispatcher (``hifi_fast.backends``) reads it.
"""
try:
    import triton  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    AVAILABLE = False
    UNAVAILABLE_REASON = f"triton is not installed ({err})"
else:
    AVAILABLE = False
    UNAVAILABLE_REASON = "the Triton kernels are not built yet"
