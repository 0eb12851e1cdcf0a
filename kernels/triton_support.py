"""Whether the Triton versions can run on a device; triton is imported lazily, only when asked."""
from __future__ import annotations
import functools, importlib
import torch

TRITON_MODULES = {"greedy_verify": "greedy_verify_triton", "rejection_verify": "rejection_verify_triton",
                  "ngram_match": "ngram_match_triton", "kv_write": "kv_write_triton",
                  "rms_norm": "rms_norm_triton", "rotary_kv": "rotary_kv_triton", "silu_mul": "silu_mul_triton"}

@functools.cache
def triton_import_error() -> str|None:
    "Why `import triton` fails (None when it works)."
    try: importlib.import_module("triton")
    except Exception as e: return f"triton is not importable ({type(e).__name__}: {e})"
    return None

def _built_for_interpreter(module) -> bool:
    "Whether the `@triton.jit` functions of `module` were built for triton's CPU interpreter."
    from triton.runtime.interpreter import InterpretedFunction
    return any(isinstance(v, InterpretedFunction) for v in vars(module).values())

def interpreted() -> bool:
    "Whether triton was imported for its CPU interpreter (`TRITON_INTERPRET=1` before the first `import triton`)."
    import triton.language.standard as standard          # triton's own jitted library (max, sum, ...) is built at import
    return _built_for_interpreter(standard)

def triton_module(name:str):
    "The module holding the Triton version of kernel `name`."
    module = importlib.import_module(f"{__package__}.{TRITON_MODULES[name]}")
    if _built_for_interpreter(module) != interpreted():
        raise RuntimeError(f"{module.__name__} and triton were built in different modes (compiled vs interpreter): "
                           "TRITON_INTERPRET changed after triton was imported; set it before anything imports triton")
    return module

def triton_unavailable(device) -> str|None:
    "Why the Triton kernels cannot run on `device` (None when they can)."
    device = torch.device(device)
    if (err := triton_import_error()) is not None: return err
    if device.type == "cuda":
        if not torch.cuda.is_available(): return "CUDA is not available to torch"
        return "triton was imported for its CPU interpreter (TRITON_INTERPRET=1)" if interpreted() else None
    if device.type == "cpu":
        return None if interpreted() else ("Triton runs on CUDA; on the CPU only under its interpreter "
                                           "(TRITON_INTERPRET=1 set before triton is first imported)")
    return f"no Triton support for device type {device.type!r}"
