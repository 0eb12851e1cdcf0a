"""Rotary embedding of the queries and keys plus the KV-cache write, torch reference: from one fused q/k/v projection
output to the rotated queries, with the rotated keys and the values written into the cache at their slots."""
from __future__ import annotations
import torch
from .checks import check_rotary_kv

def rotate(x:torch.Tensor, cos:torch.Tensor, sin:torch.Tensor) -> torch.Tensor:
    "`x * cos + rotate_half(x) * sin`, Hugging Face's `apply_rotary_pos_emb` for one tensor (each op in x's dtype)."
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

def rotary_kv_torch(qkv:torch.Tensor,     # [B, q, (Hq + 2*Hkv) * D] the fused q/k/v projection's output
                    cos:torch.Tensor,     # [q, D] rotary table rows of the new tokens' positions ([B, q, D]: per row)
                    sin:torch.Tensor,     # [q, D] (or [B, q, D])
                    keys:torch.Tensor,    # [B, Hkv, C, D] one layer's key cache (a view is fine), written in place
                    values:torch.Tensor,  # [B, Hkv, C, D] its value cache, written in place
                    slots:torch.Tensor,   # [q] long: the cache slot of each new token ([B, q]: each row's own)
                    num_heads:int, num_kv_heads:int,
                   ) -> torch.Tensor:
    """The rotated queries `[B, Hq, q, D]`; the rotated keys and the values go to `keys`/`values` at `slots`. Rows of a
    batch at different lengths give each row its own slots `[B, q]` and rotary rows `[B, q, D]`."""
    B, q, D, C = check_rotary_kv(qkv, cos, sin, keys, values, slots, num_heads, num_kv_heads)
    query, key, value = qkv.view(B, q, -1, D).transpose(1, 2).split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    if slots.dim() == 2: cos, sin = cos[:, None], sin[:, None]          # [B, 1, q, D]: one table row per row and token
    key, value = rotate(key, cos, sin).to(keys.dtype), value.to(values.dtype)   # [B, Hkv, q, D] (a wider cache: cast)
    if slots.dim() == 1:
        keys.index_copy_(2, slots, key); values.index_copy_(2, slots, value)
    else:
        at = slots[:, None, :, None].expand(B, num_kv_heads, q, D)    # [B, Hkv, q, D] each row's slots
        keys.scatter_(2, at, key); values.scatter_(2, at, value)
    return rotate(query, cos, sin)                                    # [B, Hq, q, D]
