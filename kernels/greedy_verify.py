"""Greedy verification, torch reference: keep the drafts that equal the target's argmax, then the target's next token."""
from __future__ import annotations
import torch
from .checks import check_verify

def accepted_prefix(accept:torch.Tensor # [B, K] bool
                   ) -> torch.Tensor:
    "Length of the leading run of `True` per row: `[B]` long."
    return accept.long().cumprod(dim=1).sum(dim=1)

def greedy_verify_torch(draft_tokens:torch.Tensor,  # [B, K] long
                        target_logits:torch.Tensor  # [B, K+1, V]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    "`(n_accepted [B], next_token [B])`: drafts kept up to the first mismatch with the argmax; the argmax after them."
    B, K, V = check_verify(draft_tokens, target_logits, "target_logits")
    target_argmax = target_logits.argmax(-1)                                # [B, K+1]; ties: lowest index
    n_accepted = accepted_prefix(draft_tokens == target_argmax[:, :K])     # [B]
    return n_accepted, target_argmax.gather(1, n_accepted[:, None]).squeeze(1)
