"""N-gram match in Triton: one program per row scans the earlier starts in blocks for n = max_ngram..min_ngram and keeps
the match with the longest continuation (then the latest start), exactly like the torch reference."""
from __future__ import annotations
import torch, triton
import triton.language as tl
from .checks import check_ngram

@triton.jit(do_not_specialize=["S_cap", "stride_tokens"])   # both follow the cache's capacity: no recompile per prompt
def ngram_match_kernel(tokens_ptr, lengths_ptr, draft_ptr, n_draft_ptr, S_cap, stride_tokens, max_ngram, min_ngram, k,
                       BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    row = tokens_ptr + b * stride_tokens
    length = tl.load(lengths_ptr + b)                           # int64
    found = tl.zeros([], tl.int32)
    cont_start = length * 0                                     # int64: where the copied continuation begins
    for i in range(0, max_ngram - min_ngram + 1):
        n = max_ngram - i
        # earlier occurrences start before length - n (none when n > length - 1, or once a longer n-gram matched)
        start_limit = tl.where(found == 0, length - n, 0)
        best = length * 0 - 1                                   # best score (-1: none)
        for start in range(0, S_cap, BLOCK_S):
            starts = start + tl.arange(0, BLOCK_S)
            match = starts < start_limit
            for j in range(0, n):
                suffix_token = tl.load(row + length - n + j, mask=start_limit > 0, other=0)
                window_token = tl.load(row + starts + j, mask=match, other=-1)
                match = match & (window_token == suffix_token)
            continuation = tl.minimum(length - (starts + n), k)
            score = tl.where(match, continuation * (length + 1) + starts, -1)
            best = tl.maximum(best, tl.max(score, axis=0))
        hit = best >= 0
        cont_start = tl.where(hit, best % (length + 1) + n, cont_start)
        found = found | hit.to(tl.int32)
    n_draft = tl.where(found != 0, tl.minimum(tl.maximum(length - cont_start, 0), k), 0)
    slots = tl.arange(0, BLOCK_K)
    copied = tl.load(row + cont_start + slots, mask=slots < n_draft, other=0)
    tl.store(draft_ptr + b * k + slots, copied, mask=slots < k)
    tl.store(n_draft_ptr + b, n_draft.to(tl.int64))

def ngram_match_triton(tokens:torch.Tensor,   # [B, S_cap] long
                       lengths:torch.Tensor,  # [B] long
                       max_ngram:int, min_ngram:int, k:int,
                       block_s:int=256) -> tuple[torch.Tensor, torch.Tensor]:
    "Triton version of `ngram_match_torch` (same results)."
    B, S_cap = check_ngram(tokens, lengths, max_ngram, min_ngram, k)
    tokens, lengths = tokens.contiguous(), lengths.contiguous()
    draft = torch.empty(B, k, dtype=torch.long, device=tokens.device)
    n_draft = torch.empty(B, dtype=torch.long, device=tokens.device)
    if B == 0: return draft, n_draft
    if S_cap == 0: return draft.zero_(), n_draft.zero_()
    ngram_match_kernel[(B,)](tokens, lengths, draft, n_draft, S_cap, tokens.stride(0), max_ngram, min_ngram, k,
                             BLOCK_S=min(block_s, triton.next_power_of_2(S_cap)), BLOCK_K=triton.next_power_of_2(max(k, 1)))
    return draft, n_draft
