"""Rejection-sampling verification, torch reference: accept drafts by the ratio test, then draw the next token from the
residual by the Exp(1) race (deterministic given the noise tensors; no normalisation, no multinomial, no host sync)."""
from __future__ import annotations
import torch
from .checks import check_rejection
from .greedy_verify import accepted_prefix

def exp_race(weights:torch.Tensor,  # [B, V] non-negative, unnormalised
             exp_noise:torch.Tensor # [B, V] Exp(1) draws
            ) -> torch.Tensor:
    "Index `[B]` of `argmax(weights / exp_noise)`: a draw from `weights / weights.sum()` when the noise is Exp(1)."
    return (weights / exp_noise.float()).argmax(-1)

def rejection_verify_torch(draft_tokens:torch.Tensor,       # [B, K] long
                           draft_probs:torch.Tensor|None,   # [B, K, V]; None: one-hot drafts (no probabilities)
                           target_probs:torch.Tensor,       # [B, K+1, V]
                           uniforms:torch.Tensor,           # [B, K] U(0, 1) draws
                           exp_noise:torch.Tensor           # [B, V] Exp(1) draws
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    "`(n_accepted [B], next_token [B])` of speculative sampling (Leviathan et al. 2023), given the random draws."
    B, K, V = check_rejection(draft_tokens, draft_probs, target_probs, uniforms, exp_noise)
    target_probs = target_probs.float()                                              # [B, K+1, V]
    target_p = target_probs[:, :K].gather(-1, draft_tokens[..., None]).squeeze(-1)   # [B, K]
    if draft_probs is None: draft_p = torch.ones_like(target_p)                      # one-hot: the draft had prob 1
    else: draft_p = draft_probs.float().gather(-1, draft_tokens[..., None]).squeeze(-1)
    n_accepted = accepted_prefix(uniforms.float() * draft_p < target_p)              # u < target/draft, no division
    rows = torch.arange(B, device=n_accepted.device)
    target_row = target_probs[rows, n_accepted]                                      # [B, V]
    if draft_probs is None:                                                          # one-hot at the draft token, 0 after K
        padded = torch.cat([draft_tokens, draft_tokens.new_full((B, 1), -1)], 1)    # [B, K+1]
        vocab = torch.arange(V, device=draft_tokens.device)
        draft_row = (vocab == padded[rows, n_accepted][:, None]).float()             # [B, V]
    else:
        draft_row = torch.cat([draft_probs.float(), torch.zeros_like(target_probs[:, :1])], 1)[rows, n_accepted]
    residual = (target_row - draft_row).clamp_min(0)                                 # [B, V]
    weights = torch.where(residual.amax(-1, keepdim=True) > 0, residual, target_row) # zero mass: the target row
    return n_accepted, exp_race(weights, exp_noise)
