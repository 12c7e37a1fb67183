"""Triton kernels, each next to its pure-torch `_ref` twin, and the one switch that picks between them.

Names resolve lazily (module `__getattr__`) so that `import kernels` costs nothing until a kernel is used:
importing Triton takes about a second and is not needed on the CPU path.
"""
import importlib
import os

_EXPORTS = {
    "Routing": "routing", "route_topk": "routing", "route_topk_ref": "routing",
    "grouped_mm": "grouped_gemm", "grouped_mm_ref": "grouped_gemm",
    "KDLossOutput": "kd_loss", "linear_topk_kd_loss": "kd_loss", "linear_topk_kd_loss_ref": "kd_loss",
}
_MODES = ("auto", "triton", "torch")


def use_triton(t) -> bool:
    """Whether the Triton kernel (True) or the torch `_ref` path (False) should handle tensor `t`.

    DISTILL_KERNELS=auto (default): Triton on CUDA tensors when Triton imports, torch otherwise.
    DISTILL_KERNELS=triton: always Triton (on CPU tensors this needs TRITON_INTERPRET=1: the tests' mode).
    DISTILL_KERNELS=torch: always the torch path (a debugging baseline on GPU).
    """
    mode = os.environ.get("DISTILL_KERNELS", "auto").lower()
    if mode not in _MODES:
        raise ValueError(f"DISTILL_KERNELS={mode!r} is not one of {_MODES}; unset it or pick one of those")
    if mode != "auto":
        return mode == "triton"
    if not t.is_cuda:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"kernels.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")


__all__ = ["use_triton", *_EXPORTS]
