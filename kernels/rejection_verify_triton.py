"""Rejection-sampling verification in Triton: one program per row runs the ratio test over the K drafts, then the Exp(1)
race over the residual at the first rejection, in blocks over V (exact float32 division, so it matches torch bit for bit)."""
from __future__ import annotations
import torch, triton
import triton.language as tl
from .checks import check_rejection

@triton.jit
def rejection_verify_kernel(draft_ptr, draft_probs_ptr, target_probs_ptr, uniforms_ptr, noise_ptr, n_ptr, next_ptr,
                            K, V, stride_draft, stride_dp_b, stride_dp_k, stride_tp_b, stride_tp_k, stride_u, stride_noise,
                            HAS_DRAFT_PROBS: tl.constexpr, BLOCK_V: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    # ratio test: accept draft i iff u_i * draft_p < target_p, stopping at the first rejection
    n = tl.zeros([], tl.int32)                                  # a tensor even when K = 0
    running = tl.full([], 1, tl.int32)
    for i in range(0, K):
        token = tl.load(draft_ptr + b * stride_draft + i)
        target_p = tl.load(target_probs_ptr + b * stride_tp_b + i * stride_tp_k + token).to(tl.float32)
        u = tl.load(uniforms_ptr + b * stride_u + i).to(tl.float32)
        if HAS_DRAFT_PROBS:
            draft_p = tl.load(draft_probs_ptr + b * stride_dp_b + i * stride_dp_k + token).to(tl.float32)
            accept = u * draft_p < target_p
        else:
            accept = u < target_p                                   # one-hot draft: draft_p = 1
        running = running * accept.to(tl.int32)
        n += running
    # the race at row n: argmax(residual / noise), or argmax(target / noise) when the residual has no mass
    has_draft_row = n < K
    draft_row_len = tl.where(has_draft_row, V, 0)              # no draft row after K accepts
    draft_token = tl.load(draft_ptr + b * stride_draft + n, mask=has_draft_row, other=-1)
    target_row = target_probs_ptr + b * stride_tp_b + n * stride_tp_k
    draft_row = draft_probs_ptr + b * stride_dp_b + n * stride_dp_k
    noise_row = noise_ptr + b * stride_noise
    best_res = -float("inf")
    idx_res = 0
    best_tgt = -float("inf")
    idx_tgt = 0
    residual_max = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        valid = offs < V
        target = tl.load(target_row + offs, mask=valid, other=0.0).to(tl.float32)
        if HAS_DRAFT_PROBS:
            draft = tl.load(draft_row + offs, mask=offs < draft_row_len, other=0.0).to(tl.float32)
        else:
            draft = tl.where(offs == draft_token, 1.0, 0.0)
        residual = tl.maximum(target - draft, 0.0)
        noise = tl.load(noise_row + offs, mask=valid, other=1.0).to(tl.float32)
        key_res = tl.where(valid, tl.math.div_rn(residual, noise), -float("inf"))
        key_tgt = tl.where(valid, tl.math.div_rn(target, noise), -float("inf"))
        m_res = tl.max(key_res, axis=0)
        i_res = tl.min(tl.where(key_res == m_res, offs, V), axis=0)
        better = m_res > best_res
        idx_res = tl.where(better, i_res, idx_res)
        best_res = tl.where(better, m_res, best_res)
        m_tgt = tl.max(key_tgt, axis=0)
        i_tgt = tl.min(tl.where(key_tgt == m_tgt, offs, V), axis=0)
        better = m_tgt > best_tgt
        idx_tgt = tl.where(better, i_tgt, idx_tgt)
        best_tgt = tl.where(better, m_tgt, best_tgt)
        residual_max = tl.maximum(residual_max, tl.max(tl.where(valid, residual, 0.0), axis=0))
    tl.store(n_ptr + b, n.to(tl.int64))
    tl.store(next_ptr + b, tl.where(residual_max > 0, idx_res, idx_tgt).to(tl.int64))

def rejection_verify_triton(draft_tokens:torch.Tensor,      # [B, K] long
                            draft_probs:torch.Tensor|None,  # [B, K, V]; None: one-hot drafts
                            target_probs:torch.Tensor,      # [B, K+1, V]
                            uniforms:torch.Tensor,          # [B, K]
                            exp_noise:torch.Tensor,         # [B, V]
                            block_v:int=1024) -> tuple[torch.Tensor, torch.Tensor]:
    "Triton version of `rejection_verify_torch` (same results)."
    B, K, V = check_rejection(draft_tokens, draft_probs, target_probs, uniforms, exp_noise)
    last_dim_contiguous = lambda t: t if t is None or t.stride(-1) == 1 else t.contiguous()
    draft_tokens, uniforms = draft_tokens.contiguous(), uniforms.contiguous()
    draft_probs, target_probs, exp_noise = map(last_dim_contiguous, (draft_probs, target_probs, exp_noise))
    device = draft_tokens.device
    n_accepted = torch.empty(B, dtype=torch.long, device=device)
    next_token = torch.empty(B, dtype=torch.long, device=device)
    if B == 0: return n_accepted, next_token
    has_draft_probs = draft_probs is not None
    dp = draft_probs if has_draft_probs else target_probs        # a valid pointer, never read without draft probs
    rejection_verify_kernel[(B,)](draft_tokens, dp, target_probs, uniforms, exp_noise, n_accepted, next_token,
                                  K, V, draft_tokens.stride(0), dp.stride(0), dp.stride(1), target_probs.stride(0),
                                  target_probs.stride(1), uniforms.stride(0), exp_noise.stride(0),
                                  HAS_DRAFT_PROBS=has_draft_probs, BLOCK_V=min(block_v, triton.next_power_of_2(V)))
    return n_accepted, next_token
