"""Rejection sampling keeps the target's distribution (chi-square tests with fixed seeds), and the same test
rejects a deliberately wrong acceptance rule, so it can fail."""
import itertools, pytest, torch
from scipy.stats import chisquare
from specdec import generate
from specdec.models import tiny_llama
from specdec.sampling import SamplingConfig, logits_to_probs, sample
from specdec.policies import RejectionSampling
from specdec.drafters import Drafter, DraftModel
from specdec.controllers import FixedK

V = 16            # small vocabulary: every two-token continuation is a chi-square cell
N = 200_000       # samples per test


class ResampleFromTarget(RejectionSampling):
    "Wrong on purpose: after a rejection, sample from the target instead of the residual max(0, target - draft)."
    def residual(self, target_row, draft_row): return target_row


@pytest.fixture(scope="module")
def pair():
    target = tiny_llama(vocab_size=V, hidden_size=32, num_layers=2, intermediate_size=64, seed=3, init_std=0.3)
    draft = tiny_llama(vocab_size=V, hidden_size=32, num_layers=1, intermediate_size=64, seed=4, init_std=0.3)
    return target, draft


def _next_logits(model, prefixes):
    "Logits `[n, V]` after each prefix `[n, S]` (one batched forward)."
    with torch.inference_mode(): return model.model(prefixes).logits[:, -1].float()


def _tables(target, draft, prompt):
    "Target and draft next-token logits after the prompt, after every x1, and (target) after every (x1, x2)."
    x1 = torch.arange(V)[:, None]
    pairs = torch.tensor(list(itertools.product(range(V), range(V))))
    rep = lambda n: prompt.expand(n, -1)
    t1, d1 = _next_logits(target, prompt)[0], _next_logits(draft, prompt)[0]                        # [V]
    t2, d2 = _next_logits(target, torch.cat([rep(V), x1], 1)), _next_logits(draft, torch.cat([rep(V), x1], 1))   # [V, V]
    t3 = _next_logits(target, torch.cat([rep(V * V), pairs], 1)).view(V, V, V)                      # [V, V, V]
    return t1, t2, t3, d1, d2


def _two_token_samples(policy, tables, sampling, seed):
    """The first two tokens emitted by speculative steps (K=2, then K=1 where the first step emitted only one),
    for N independent runs at once."""
    t1, t2, t3, d1, d2 = tables
    g = torch.Generator().manual_seed(seed)
    draft_p1 = logits_to_probs(d1, sampling).expand(N, V)                       # [N, V]
    x1 = sample(draft_p1, g)                                                     # [N]
    draft_p2 = logits_to_probs(d2[x1], sampling)                                 # [N, V]
    x2 = sample(draft_p2, g)
    draft_tokens = torch.stack([x1, x2], 1)                                      # [N, K=2]
    draft_probs = torch.stack([draft_p1, draft_p2], 1)                           # [N, 2, V]
    target_logits = torch.stack([t1.expand(N, V), t2[x1], t3[x1, x2]], 1)        # [N, K+1=3, V]
    v = policy(draft_tokens, draft_probs, target_logits, sampling, g)
    n = v.n_accepted
    y1 = torch.where(n >= 1, x1, v.next_token)
    y2 = torch.where(n >= 2, x2, v.next_token)
    # runs that emitted one token take a second step with K=1 from the context (prompt, y1)
    draft_q = logits_to_probs(d2[y1], sampling)                                  # [N, V]
    z = sample(draft_q, g)
    v2 = policy(z[:, None], draft_q[:, None], torch.stack([t2[y1], t3[y1, z]], 1), sampling, g)
    y2 = torch.where(n == 0, torch.where(v2.n_accepted >= 1, z, v2.next_token), y2)
    return y1 * V + y2                                                           # [N] joint cell


def _chi2_pvalue(cells, expected_probs):
    observed = torch.bincount(cells, minlength=V * V).double()
    expected = expected_probs.double().flatten() * cells.numel()
    keep = expected >= 5                                                          # pool the rare cells
    obs = torch.cat([observed[keep], observed[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    if exp[-1] < 5: obs, exp = obs[:-1], exp[:-1]
    return chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue


@pytest.mark.parametrize("sampling", [SamplingConfig(1.0), SamplingConfig(0.7, top_p=0.9)], ids=["T1", "T0.7-p0.9"])
def test_rejection_sampling_keeps_target_distribution(pair, sampling):
    target, draft = pair
    tables = _tables(target, draft, torch.tensor([[1, 5, 7]]))
    p1 = logits_to_probs(tables[0], sampling)                                    # [V]
    joint = p1[:, None] * logits_to_probs(tables[1], sampling)                   # [V, V] target's two-token law
    cells = _two_token_samples(RejectionSampling(), tables, sampling, seed=0)
    assert _chi2_pvalue(cells, joint) > 1e-3
    # the draft is really different from the target, so the test has something to correct
    assert (logits_to_probs(tables[3], sampling) - p1).abs().sum() > 0.2
    # the same test rejects a rule that resamples from the target after a rejection
    wrong = _two_token_samples(ResampleFromTarget(), tables, sampling, seed=0)
    assert _chi2_pvalue(wrong, joint) < 1e-6


def _generated_pairs(target, draft, prompt, sampling, policy, runs):
    """The first two tokens of `runs` seeded generate() calls of 3 tokens with a draft model (or any drafter) and
    FixedK(2) (the first step drafts 2: with max_new_tokens=2 the loop would clamp K to 1), and the number of steps
    that drafted 2."""
    drafter, cells, k2_steps = (draft if isinstance(draft, Drafter) else DraftModel(draft)), [], 0
    for seed in range(runs):
        out = generate(target, prompt, drafter=drafter, policy=policy, controller=FixedK(2), max_new_tokens=3,
                       temperature=sampling.temperature, top_p=sampling.top_p, seed=seed, eos_token_id=[])
        cells.append(out.tokens[0, 0] * V + out.tokens[0, 1])
        by_position = out.stats.proposed_by_position
        k2_steps += by_position[1] if len(by_position) > 1 else 0                     # steps that proposed 2 drafts
    return torch.stack(cells), k2_steps


def test_generate_samples_from_target_distribution(pair):
    "End to end through generate(): 4,000 seeded runs at T=0.7, top-p 0.9, drafted by another model with K=2."
    target, draft = pair
    sampling, prompt, runs = SamplingConfig(0.7, top_p=0.9), torch.tensor([[1, 5, 7]]), 4000
    tables = _tables(target, draft, prompt)
    p1 = logits_to_probs(tables[0], sampling)                                    # [V]
    joint = p1[:, None] * logits_to_probs(tables[1], sampling)                   # [V, V] target's two-token law
    assert (p1 == 0).sum() > 0 and (logits_to_probs(tables[0], SamplingConfig(0.7)) > 0).all()   # top-p cuts tokens
    cells, k2_steps = _generated_pairs(target, draft, prompt, sampling, RejectionSampling(), runs)
    assert k2_steps == runs                                                      # every run's first step drafted K=2
    assert _chi2_pvalue(cells, joint) > 1e-3
    # the same end-to-end test rejects a rule that resamples from the target after a rejection
    wrong, _ = _generated_pairs(target, draft, prompt, sampling, ResampleFromTarget(), runs)
    assert _chi2_pvalue(wrong, joint) < 1e-6
