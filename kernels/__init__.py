"""Kernels for specdec's step on the device: each has a pure-torch reference (`*_torch`) and a Triton version
(`*_triton`, in `*_triton.py`, imported only when asked). `specdec.kernels` picks one per device."""
from .greedy_verify import greedy_verify_torch, accepted_prefix
from .rejection_verify import rejection_verify_torch, exp_race
from .ngram_match import ngram_match_torch
from .kv_write import kv_write_torch

KERNEL_NAMES = ("greedy_verify", "rejection_verify", "ngram_match", "kv_write")
TORCH_REFERENCES = {"greedy_verify": greedy_verify_torch, "rejection_verify": rejection_verify_torch,
                    "ngram_match": ngram_match_torch, "kv_write": kv_write_torch}
