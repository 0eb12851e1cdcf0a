"""KV-cache write in Triton: one program per (row, head, new position) copies one head vector of D values."""
from __future__ import annotations
import torch, triton
import triton.language as tl
from .checks import check_kv_write

@triton.jit
def kv_write_kernel(cache_ptr, new_ptr, positions_ptr, H, C, D,
                    cs_b, cs_h, cs_c, cs_d, ns_b, ns_h, ns_q, ns_d, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    slot = tl.load(positions_ptr + b) + t
    d = tl.arange(0, BLOCK_D)
    width = tl.where(slot >= 0, tl.where(slot < C, D, 0), 0)    # out-of-range slots are never written
    ok = d < width
    x = tl.load(new_ptr + b * ns_b + h * ns_h + t * ns_q + d * ns_d, mask=ok)
    tl.store(cache_ptr + b * cs_b + h * cs_h + slot * cs_c + d * cs_d, x, mask=ok)

def kv_write_triton(cache:torch.Tensor,     # [B, H, C, D], written in place
                    new:torch.Tensor,       # [B, H, q, D]
                    positions:torch.Tensor  # [B] long
                   ) -> torch.Tensor:
    "Triton version of `kv_write_torch` (same results)."
    B, H, C, D, q = check_kv_write(cache, new, positions)
    if B * H * q * D == 0: return cache
    positions = positions.contiguous()
    kv_write_kernel[(B * H, q)](cache, new, positions, H, C, D, *cache.stride(), *new.stride(),
                                BLOCK_D=triton.next_power_of_2(D))
    return cache
