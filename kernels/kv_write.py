"""KV-cache write at per-row positions, torch reference: `cache[b, :, positions[b] + t] = new[b, :, t]`."""
from __future__ import annotations
import torch
from .checks import check_kv_write

def kv_write_torch(cache:torch.Tensor,     # [B, H, C, D] one layer's keys or values (a view is fine), written in place
                   new:torch.Tensor,       # [B, H, q, D] same dtype
                   positions:torch.Tensor  # [B] long: where row b's q new entries start
                  ) -> torch.Tensor:
    "Write `new` into `cache` at `positions[b] .. positions[b] + q - 1` for each row b; return `cache`."
    B, H, C, D, q = check_kv_write(cache, new, positions)
    slots = positions[:, None] + torch.arange(q, device=positions.device)          # [B, q]
    return cache.scatter_(2, slots[:, None, :, None].expand(B, H, q, D), new)
