"""Kernels for specdec's step on the device: each has a pure-torch reference (`*_torch`) and a Triton version
(`*_triton`, in `*_triton.py`, imported only when asked). `specdec.kernels` picks one per device."""
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
