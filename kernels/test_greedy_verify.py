"Greedy verification: the torch reference against a per-row loop, and the Triton kernel against the reference."
import pytest, torch
from specdec_kernels import greedy_verify_torch

def loop_greedy(draft_tokens, target_logits):
    "Row by row, position by position: the rule as written."
    n_accepted, next_token = [], []
    for drafts, logits in zip(draft_tokens.tolist(), target_logits.float()):
        n = 0
        while n < len(drafts) and drafts[n] == int(torch.argmax(logits[n])): n += 1
        n_accepted.append(n); next_token.append(int(torch.argmax(logits[n])))
    return n_accepted, next_token

def make_case(B, K, V, seed, ties=False):
    "Random logits with rows that accept all, none and some drafts (ties: integer logits in {0, 1, 2})."
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, 3, (B, K + 1, V), generator=g).float() if ties else torch.randn(B, K + 1, V, generator=g)
    drafts = logits.argmax(-1)[:, :K].clone()                       # all accepted
    if K: drafts[1, 0] = (drafts[1, 0] + 1) % V                      # row 1: none accepted
    if B > 2 and K > 1: drafts[2, K // 2] = (drafts[2, K // 2] + 1) % V   # row 2: a mismatch in the middle
    return drafts, logits

@pytest.mark.parametrize("K,V", [(1, 1000), (4, 1000), (3, 37), (0, 50)])
def test_reference_follows_the_rule(K, V):
    drafts, logits = make_case(4, K, V, seed=K * 100 + V)
    n, nxt = greedy_verify_torch(drafts, logits)
    assert (n.tolist(), nxt.tolist()) == loop_greedy(drafts, logits)
    if K: assert n[0] == K and n[1] == 0                            # the all- and none-accepted rows

def test_ties_resolve_to_the_lowest_index():
    logits = torch.zeros(1, 2, 300)
    logits[0, 0, [5, 200]] = 1.0                                     # tie across Triton blocks of 128
    logits[0, 1, [130, 131, 299]] = 2.0
    n, nxt = greedy_verify_torch(torch.tensor([[5]]), logits)
    assert n.tolist() == [1] and nxt.tolist() == [130]

@pytest.mark.parametrize("K,V,ties,dtype", [(1, 1000, False, torch.float32), (4, 1000, False, torch.float32),
                                            (3, 300, True, torch.float32), (2, 77, True, torch.bfloat16), (0, 50, False, torch.float32)])
def test_triton_matches_reference(triton_impl, device, K, V, ties, dtype):
    greedy_verify_triton = triton_impl("greedy_verify")
    drafts, logits = make_case(4, K, V, seed=7 + K + V, ties=ties)
    drafts, logits = drafts.to(device), logits.to(device, dtype)
    expected = greedy_verify_torch(drafts, logits)
    got = greedy_verify_triton(drafts, logits, block_v=128)
    for e, g in zip(expected, got): assert g.dtype == torch.long and torch.equal(e, g)

def test_triton_tie_across_blocks(triton_impl, device):
    logits = torch.zeros(2, 2, 300, device=device)
    logits[:, 0, [5, 200]] = 1.0
    logits[:, 1, [130, 131, 299]] = 2.0
    n, nxt = triton_impl("greedy_verify")(torch.tensor([[5], [200]], device=device), logits, block_v=128)
    assert n.tolist() == [1, 0] and nxt.tolist() == [130, 5]

def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"target_logits must have shape \[B, K\+1, V\]"):
        greedy_verify_torch(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, 10))
    with pytest.raises(TypeError, match="draft_tokens must have dtype torch.int64"):
        greedy_verify_torch(torch.zeros(2, 3), torch.zeros(2, 4, 10))
