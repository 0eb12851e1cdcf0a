"""SwiGLU's gate: `silu(gate) * up` over the fused gate/up projection's output, torch reference."""
from __future__ import annotations
import torch
import torch.nn.functional as F
from .checks import check_silu_mul

def silu_mul_torch(gate_up:torch.Tensor  # [..., 2I]: the gate projection's I outputs, then the up projection's
                  ) -> torch.Tensor:
    "`silu(gate) * up`, `[..., I]`, each op in gate_up's dtype as Hugging Face's MLP computes it."
    I = check_silu_mul(gate_up)
    return F.silu(gate_up[..., :I]) * gate_up[..., I:]
