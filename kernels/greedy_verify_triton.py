"""Greedy verification in Triton: one program per (row, position) finds the argmax over V in blocks (ties: lowest index,
like `torch.argmax`), then one program per row compares with the drafts."""
from __future__ import annotations
import torch, triton
import triton.language as tl
from .checks import check_verify

@triton.jit
def row_argmax_kernel(logits_ptr, out_ptr, V, stride_b, stride_p, KP1, BLOCK_V: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64)
    row = logits_ptr + b * stride_b + p * stride_p
    best = -float("inf")
    best_idx = 0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(row + offs, mask=offs < V, other=-float("inf")).to(tl.float32)
        block_max = tl.max(x, axis=0)
        block_idx = tl.min(tl.where(x == block_max, offs, V), axis=0)   # lowest index of the block's max
        better = block_max > best                                       # strict: earlier blocks win ties
        best_idx = tl.where(better, block_idx, best_idx)
        best = tl.where(better, block_max, best)
    tl.store(out_ptr + b * KP1 + p, best_idx.to(tl.int64))

@triton.jit
def greedy_accept_kernel(draft_ptr, argmax_ptr, n_ptr, next_ptr, K, stride_draft):
    b = tl.program_id(0).to(tl.int64)
    n = tl.zeros([], tl.int32)                                  # a tensor even when K = 0
    running = tl.full([], 1, tl.int32)
    for i in range(0, K):
        draft = tl.load(draft_ptr + b * stride_draft + i)
        target = tl.load(argmax_ptr + b * (K + 1) + i)
        running = running * (draft == target).to(tl.int32)
        n += running
    tl.store(n_ptr + b, n.to(tl.int64))
    tl.store(next_ptr + b, tl.load(argmax_ptr + b * (K + 1) + n))

def greedy_verify_triton(draft_tokens:torch.Tensor,  # [B, K] long
                         target_logits:torch.Tensor, # [B, K+1, V]
                         block_v:int=1024) -> tuple[torch.Tensor, torch.Tensor]:
    "Triton version of `greedy_verify_torch` (same results)."
    B, K, V = check_verify(draft_tokens, target_logits, "target_logits")
    if target_logits.stride(2) != 1: target_logits = target_logits.contiguous()
    draft_tokens = draft_tokens.contiguous()
    device = draft_tokens.device
    target_argmax = torch.empty(B, K + 1, dtype=torch.long, device=device)   # [B, K+1]
    n_accepted = torch.empty(B, dtype=torch.long, device=device)
    next_token = torch.empty(B, dtype=torch.long, device=device)
    if B == 0: return n_accepted, next_token
    block = min(block_v, triton.next_power_of_2(V))
    row_argmax_kernel[(B, K + 1)](target_logits, target_argmax, V, target_logits.stride(0), target_logits.stride(1), K + 1,
                                  BLOCK_V=block)
    greedy_accept_kernel[(B,)](draft_tokens, target_argmax, n_accepted, next_token, K, draft_tokens.stride(0))
    return n_accepted, next_token
