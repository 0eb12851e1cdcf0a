"""Rotary embedding plus KV-cache write in Triton: one program per (row, new token, head) of the fused q/k/v output;
query heads are rotated into a new `[B, Hq, q, D]` tensor, key heads rotated and value heads copied into the cache."""
from __future__ import annotations
import torch, triton
import triton.language as tl
from .checks import check_rotary_kv

@triton.jit
def rotary_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, q_out_ptr, k_ptr, v_ptr, slots_ptr, q_len, Hq, Hkv,
                     qs_b, qs_t, cs_b, cs_t, ss_b, os_b, os_h, os_t, ks_b, ks_h, ks_c, vs_b, vs_h, vs_c,
                     HALF: tl.constexpr, BLOCK: tl.constexpr):
    bt = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    b = bt // q_len
    t = bt % q_len
    d = tl.arange(0, BLOCK)
    ok = d < HALF
    src = qkv_ptr + b * qs_b + t * qs_t + head * 2 * HALF
    x1 = tl.load(src + d, mask=ok, other=0.0)
    x2 = tl.load(src + HALF + d, mask=ok, other=0.0)
    slot = tl.load(slots_ptr + b * ss_b + t)                # ss_b, cs_b: 0 when the rows share slots and positions
    # The outputs' dtypes may differ (a float32 cache for a half-precision net): Triton gives a variable assigned in
    # both arms of a runtime `if` one type, so each arm stores through its own pointer, cast to that output's dtype.
    if head >= Hq + Hkv:                                    # a value head: copied as is
        v_dest = v_ptr + b * vs_b + (head - Hq - Hkv) * vs_h + slot * vs_c
        tl.store(v_dest + d, x1.to(v_ptr.dtype.element_ty), mask=ok)
        tl.store(v_dest + HALF + d, x2.to(v_ptr.dtype.element_ty), mask=ok)
    else:
        c1 = tl.load(cos_ptr + b * cs_b + t * cs_t + d, mask=ok, other=0.0)
        c2 = tl.load(cos_ptr + b * cs_b + t * cs_t + HALF + d, mask=ok, other=0.0)
        s1 = tl.load(sin_ptr + b * cs_b + t * cs_t + d, mask=ok, other=0.0)
        s2 = tl.load(sin_ptr + b * cs_b + t * cs_t + HALF + d, mask=ok, other=0.0)
        # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1); each product rounded to the dtype, as torch does
        ty = x1.dtype
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        y1 = ((f1 * c1.to(tl.float32)).to(ty).to(tl.float32) + (-f2 * s1.to(tl.float32)).to(ty).to(tl.float32)).to(ty)
        y2 = ((f2 * c2.to(tl.float32)).to(ty).to(tl.float32) + (f1 * s2.to(tl.float32)).to(ty).to(tl.float32)).to(ty)
        if head < Hq:                                       # a query head: into the new query tensor
            q_dest = q_out_ptr + b * os_b + head * os_h + t * os_t
            tl.store(q_dest + d, y1, mask=ok)
            tl.store(q_dest + HALF + d, y2, mask=ok)
        else:                                               # a key head: into the cache
            k_dest = k_ptr + b * ks_b + (head - Hq) * ks_h + slot * ks_c
            tl.store(k_dest + d, y1.to(k_ptr.dtype.element_ty), mask=ok)
            tl.store(k_dest + HALF + d, y2.to(k_ptr.dtype.element_ty), mask=ok)

def rotary_kv_triton(qkv:torch.Tensor, cos:torch.Tensor, sin:torch.Tensor, keys:torch.Tensor, values:torch.Tensor,
                     slots:torch.Tensor, num_heads:int, num_kv_heads:int) -> torch.Tensor:
    "Triton version of `rotary_kv_torch` (same results up to the rounding of each product)."
    B, q, D, C = check_rotary_kv(qkv, cos, sin, keys, values, slots, num_heads, num_kv_heads)
    query = torch.empty(B, num_heads, q, D, dtype=qkv.dtype, device=qkv.device)
    if B * q == 0: return query
    if qkv.stride(2) != 1: qkv = qkv.contiguous()
    cos, sin, slots = cos.to(qkv.dtype).contiguous(), sin.to(qkv.dtype).contiguous(), slots.contiguous()
    for t in (keys, values):
        if t.stride(3) != 1: raise ValueError("keys and values must be contiguous in the head dim")
    rows = slots.dim() == 2                                           # each row's own slots and rotary rows
    rotary_kv_kernel[(B * q, num_heads + 2 * num_kv_heads)](
        qkv, cos, sin, query, keys, values, slots, q, num_heads, num_kv_heads, qkv.stride(0), qkv.stride(1),
        cos.stride(0) if rows else 0, cos.stride(-2), slots.stride(0) if rows else 0,
        *query.stride()[:3], *keys.stride()[:3], *values.stride()[:3],
        HALF=D // 2, BLOCK=triton.next_power_of_2(D // 2))
    return query
