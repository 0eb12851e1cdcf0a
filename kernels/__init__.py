"""Kernels for specdec's step on the device: each has a pure-torch reference (`*_torch`) and a Triton version
(`*_triton`, in `*_triton.py`, imported only when asked). `specdec.kernels` picks one per device."""
import os as _os, sys as _sys, importlib.machinery as _machinery, importlib.util as _util


def _other_kernels_package():
    """The spec of a `kernels` package elsewhere on sys.path than this repository's root, or None. Hugging Face's kernel
    hub package has that name, and transformers imports it where it is installed (5.25 and later depend on it)."""
    root = _os.path.realpath(_os.path.join(_os.path.dirname(__file__), _os.pardir))
    others = [p for p in _sys.path if isinstance(p, str) and _os.path.realpath(p or _os.getcwd()) != root]
    return _machinery.PathFinder.find_spec("kernels", others)


_spec = _other_kernels_package() if __name__ == "kernels" else None
if _spec is not None:
    # This folder installs as `specdec_kernels`; it was imported by its folder name because the repository root is on
    # sys.path (`python -m ...`, pytest or a kernel started there, PYTHONPATH). The name belongs to the other package:
    # it takes `kernels`, and this folder's modules (its tests, its conftest) stay importable as `kernels.<module>`.
    _module = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
    _module.__path__ = [*_module.__path__, _os.path.dirname(__file__)]
else:
    from .greedy_verify import greedy_verify_torch, accepted_prefix
    from .rejection_verify import rejection_verify_torch, exp_race
    from .ngram_match import ngram_match_torch
    from .kv_write import kv_write_torch
    from .rms_norm import rms_norm_torch
    from .rotary_kv import rotary_kv_torch
    from .silu_mul import silu_mul_torch

    KERNEL_NAMES = ("greedy_verify", "rejection_verify", "ngram_match", "kv_write", "rms_norm", "rotary_kv", "silu_mul")
    TORCH_REFERENCES = {"greedy_verify": greedy_verify_torch, "rejection_verify": rejection_verify_torch,
                        "ngram_match": ngram_match_torch, "kv_write": kv_write_torch, "rms_norm": rms_norm_torch,
                        "rotary_kv": rotary_kv_torch, "silu_mul": silu_mul_torch}
    STEP_KERNELS = ("rms_norm", "rotary_kv", "silu_mul")   # the decoder step's fused ops (float outputs: equal up to rounding)
