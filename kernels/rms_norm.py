"""RMS norm with an optional residual add first, torch reference: the arithmetic of Hugging Face's `LlamaRMSNorm`."""
from __future__ import annotations
import torch
from .checks import check_rms_norm

def rms_norm_torch(x:torch.Tensor,         # [..., H]
                   weight:torch.Tensor,    # [H]
                   eps:float,
                   residual:torch.Tensor|None=None  # [..., H] added to x first (the decoder's residual stream)
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(weight * norm(s), s)` with `s = x + residual` (or `x`): the variance in float32, the normalised value cast back
    to x's dtype before the weight, as `LlamaRMSNorm` does; `s` is rounded to x's dtype (the new residual stream)."""
    check_rms_norm(x, weight, residual)
    summed = x if residual is None else x + residual
    h = summed.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), summed
