"""N-gram match (PromptLookup on the device), torch reference: copy what followed the latest earlier occurrence of the
last n tokens, n = max_ngram..min_ngram, preferring the match with the longest available continuation."""
from __future__ import annotations
import torch
from .checks import check_ngram

def ngram_match_torch(tokens:torch.Tensor,   # [B, S_cap] long; row b valid at positions < lengths[b]
                      lengths:torch.Tensor,  # [B] long
                      max_ngram:int, min_ngram:int, k:int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    "`(draft [B, k] long, n_draft [B] long)`: up to k copied tokens per row (unused slots 0), and how many are valid."
    B, S_cap = check_ngram(tokens, lengths, max_ngram, min_ngram, k)
    device = tokens.device
    found = torch.zeros(B, dtype=torch.bool, device=device)
    cont_start = torch.zeros(B, dtype=torch.long, device=device)       # where the copied continuation begins
    for n in range(max_ngram, min_ngram - 1, -1):
        if n >= S_cap: continue                                        # needs n <= length - 1 <= S_cap - 1
        windows = tokens.unfold(1, n, 1)                               # [B, S_cap-n+1, n]; window at each start
        suffix_at = (lengths - n).clamp_min(0)[:, None] + torch.arange(n, device=device)   # [B, n]
        suffix = tokens.gather(1, suffix_at.clamp_max(S_cap - 1))      # [B, n] the last n tokens
        starts = torch.arange(windows.shape[1], device=device)         # [S_cap-n+1]
        match = (windows == suffix[:, None]).all(-1) & (starts < (lengths - n)[:, None])   # earlier occurrences only
        continuation = (lengths[:, None] - (starts + n)).clamp(max=k)  # [B, S_cap-n+1] tokens available to copy
        score = torch.where(match, continuation * (lengths[:, None] + 1) + starts, -1)
        best = score.max(-1)                                           # longest continuation, then latest start
        hit = (best.values >= 0) & ~found
        cont_start = torch.where(hit, best.indices + n, cont_start)
        found |= hit
    n_draft = torch.where(found, (lengths - cont_start).clamp(min=0, max=k), 0)          # [B]
    slots = torch.arange(k, device=device)                                               # [k]
    at = (cont_start[:, None] + slots).clamp_max(S_cap - 1)                              # [B, k]
    draft = torch.where(slots < n_draft[:, None], tokens.gather(1, at), 0)
    return draft, n_draft
