"""Rejection verification: the torch reference against the rule and, statistically, against `specdec.policies.RejectionSampling`;
the Triton kernel against the reference (exactly: both are deterministic given the noise)."""
import pytest, torch
from scipy.stats import chi2_contingency, chisquare
from specdec_kernels import rejection_verify_torch, exp_race
from specdec.policies import RejectionSampling
from specdec.sampling import SamplingConfig

def make_case(B, K, V, seed, with_draft_probs=True):
    """Random inputs; row 0 accepts every draft (uniforms 0), row 1 none (target gives draft 0 zero probability),
    row 2 (when B > 3) rejects with a residual of zero mass (draft == target at the first draft)."""
    g = torch.Generator().manual_seed(seed)
    target_probs = torch.softmax(2 * torch.randn(B, K + 1, V, generator=g), -1)        # [B, K+1, V]
    draft_probs = torch.softmax(2 * torch.randn(B, K, V, generator=g), -1)             # [B, K, V]
    draft_tokens = torch.multinomial(draft_probs.reshape(-1, V), 1, generator=g).view(B, K)
    uniforms = torch.rand(B, K, generator=g)
    exp_noise = torch.empty(B, V).exponential_(generator=g)
    if K:
        uniforms[0] = 0.0
        target_probs[1, 0, draft_tokens[1, 0]] = 0.0
        if B > 3:
            draft_probs[2, 0] = target_probs[2, 0]
            uniforms[2, 0] = 1.0                                                        # u * p < p fails: rejected
    return draft_tokens, (draft_probs if with_draft_probs else None), target_probs, uniforms, exp_noise

def loop_rejection(draft_tokens, draft_probs, target_probs, uniforms, exp_noise):
    "Row by row: the rule as written."
    out_n, out_next = [], []
    for b in range(draft_tokens.shape[0]):
        K = draft_tokens.shape[1]
        n = 0
        while n < K:
            tok = draft_tokens[b, n]
            draft_p = 1.0 if draft_probs is None else draft_probs[b, n, tok]
            if not uniforms[b, n] * draft_p < target_probs[b, n, tok]: break
            n += 1
        target_row = target_probs[b, n]
        if n == K: draft_row = torch.zeros_like(target_row)
        elif draft_probs is None: draft_row = torch.nn.functional.one_hot(draft_tokens[b, n], target_row.shape[0]).float()
        else: draft_row = draft_probs[b, n]
        residual = (target_row - draft_row).clamp_min(0)
        weights = residual if residual.sum() > 0 else target_row
        out_n.append(n); out_next.append(int(torch.argmax(weights / exp_noise[b])))
    return out_n, out_next

@pytest.mark.parametrize("K,V,with_draft_probs", [(1, 1000, True), (3, 1000, True), (3, 37, False), (1, 37, False), (0, 20, True)])
def test_reference_follows_the_rule(K, V, with_draft_probs):
    args = make_case(5, K, V, seed=K * 10 + V, with_draft_probs=with_draft_probs)
    n, nxt = rejection_verify_torch(*args)
    assert (n.tolist(), nxt.tolist()) == loop_rejection(*args)
    if K: assert n[0] == K and n[1] == 0
    if K and with_draft_probs: assert n[2] == 0 and nxt[2] == exp_race(args[2][2:3, 0], args[4][2:3])[0]   # zero mass: target row

@pytest.mark.parametrize("K,V,with_draft_probs,dtype", [(1, 1000, True, torch.float32), (4, 1000, True, torch.float32),
                                                        (3, 300, False, torch.float32), (2, 77, True, torch.bfloat16),
                                                        (0, 20, False, torch.float32)])
def test_triton_matches_reference(triton_impl, device, K, V, with_draft_probs, dtype):
    args = make_case(5, K, V, seed=3 + K + V, with_draft_probs=with_draft_probs)
    args = tuple(a if a is None else a.to(device, dtype) if a.is_floating_point() else a.to(device) for a in args)
    expected = rejection_verify_torch(*args)
    got = triton_impl("rejection_verify")(*args, block_v=128)
    for e, g in zip(expected, got): assert g.dtype == torch.long and torch.equal(e, g)

def chisquare_p(counts, probs):
    "p-value of observed `counts` against category probabilities `probs` (float64, renormalised)."
    probs = probs.double() / probs.double().sum()
    return chisquare(counts.double().numpy(), (probs * counts.sum().double()).numpy()).pvalue

def test_exp_race_samples_the_residual():
    "A certain rejection at draft 0: the next token follows RejectionSampling's residual distribution."
    N, V = 20000, 5
    target = torch.tensor([0.4, 0.3, 0.1, 0.15, 0.05])
    draft = torch.tensor([0.1, 0.1, 0.6, 0.05, 0.15])                   # draft token 2: draft_p 0.6 > target_p 0.1
    g = torch.Generator().manual_seed(0)
    n, nxt = rejection_verify_torch(torch.full((N, 1), 2), draft.expand(N, 1, V), torch.stack([target, target]).expand(N, 2, V),
                                    torch.ones(N, 1), torch.empty(N, V).exponential_(generator=g))
    assert (n == 0).all()
    expected = RejectionSampling().residual(target[None], draft[None])[0]   # [0.5, 0.333, 0, 0.167, 0]
    counts = torch.bincount(nxt, minlength=V)
    assert counts[expected == 0].sum() == 0
    keep = expected > 0
    assert chisquare_p(counts[keep], expected[keep]) > 1e-3
    wrong = torch.bincount((target - draft).clamp_min(0).mul(torch.empty(N, V).exponential_(generator=g)).argmax(-1), minlength=V)
    assert chisquare_p(wrong[keep], expected[keep]) < 1e-6   # the check can tell a wrong race

def _joint(n, nxt, V):
    return torch.bincount(n * V + nxt, minlength=(n.max().item() + 1) * V)

def test_reference_matches_rejection_sampling_distribution():
    "Same joint distribution of (n_accepted, next_token) as the policy, with draft probabilities and one-hot drafts."
    N, K, V = 20000, 2, 4
    target_probs = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])   # [K+1, V]
    draft_probs = torch.tensor([[0.2, 0.2, 0.5, 0.1], [0.1, 0.3, 0.3, 0.3]])                              # [K, V]
    g = torch.Generator().manual_seed(1)
    for one_hot in (False, True):
        draft_tokens = torch.multinomial(draft_probs, N, replacement=True, generator=g).T.contiguous()   # [N, K]
        dp = None if one_hot else draft_probs.expand(N, K, V)
        n, nxt = rejection_verify_torch(draft_tokens, dp, target_probs.expand(N, K + 1, V), torch.rand(N, K, generator=g),
                                        torch.empty(N, V).exponential_(generator=g))
        verdict = RejectionSampling()(draft_tokens, dp, target_probs.log().expand(N, K + 1, V), SamplingConfig(1.0), g)
        table = torch.stack([_joint(n, nxt, V), _joint(verdict.n_accepted, verdict.next_token, V)])
        table = table[:, table.sum(0) > 0]
        assert chi2_contingency(table.numpy()).pvalue > 1e-3, table
        first = torch.where(n > 0, draft_tokens[:, 0], nxt)                     # the first emitted token follows the target
        assert chisquare_p(torch.bincount(first, minlength=V), target_probs[0]) > 1e-3

def test_shape_errors_name_the_problem():
    args = list(make_case(2, 3, 10, seed=0))
    args[4] = args[4][:, :9]
    with pytest.raises(ValueError, match=r"exp_noise must have shape \(2, 10\)"): rejection_verify_torch(*args)
    args = list(make_case(2, 3, 10, seed=0)); args[1] = args[1][:, :2]
    with pytest.raises(ValueError, match=r"draft_probs must have shape \(2, 3, 10\)"): rejection_verify_torch(*args)
