"Dry runs on the synthetic target: lossless, acceptance as set, and the cost model's speedup as measured."
import pytest, torch
from specdec.decode import generate
from specdec.controllers import FixedK, AdaptiveK
from specdec.costmodel import StepCosts, predicted_speedup, conditional_acceptance, measure_step_costs
from specdec.synthetic import SyntheticTarget, SyntheticDrafter, SyntheticNet, truth


@pytest.fixture(scope="module")
def target(): return SyntheticTarget()


def test_truth_and_prompt(target):
    prompt = target.encode("five words in this prompt")
    assert prompt.shape == (1, 5) and prompt.tolist() == [[truth(p, 64) for p in range(5)]]
    assert target.encode("").shape == (1, 1)
    assert target.decode(prompt[:, :2]) == "13 60"
    assert generate(target, prompt, max_new_tokens=20).tokens.equal(target.truth(5, 20))   # plain decoding


@pytest.mark.parametrize("acceptance", [0.0, 0.5, 0.9, 1.0, [1.0, 0.3]])
@pytest.mark.parametrize("k", [1, 4, 8])
def test_lossless(target, acceptance, k):
    prompt = target.encode("a b c")
    out = generate(target, prompt, drafter=SyntheticDrafter(acceptance), controller=FixedK(k), max_new_tokens=50)
    assert out.tokens.equal(target.truth(3, 50))
    s = out.stats
    assert s.new_tokens == 50 and s.accepted + s.target_forwards == 50
    if acceptance == 1.0: assert s.accepted == s.proposed
    if acceptance == 0.0: assert s.accepted == 0


def test_lossless_adaptive_and_sampling(target):
    prompt = target.encode("a b c")
    out = generate(target, prompt, drafter=SyntheticDrafter(0.7), controller=AdaptiveK(k_max=8), max_new_tokens=80)
    assert out.tokens.equal(target.truth(3, 80))
    out = generate(target, prompt, drafter=SyntheticDrafter(0.7), temperature=1.0, max_new_tokens=80)   # margin 10: near one-hot
    assert (out.tokens == target.truth(3, 80)).float().mean() > 0.9


@pytest.mark.parametrize("acceptance", [0.7, [0.9, 0.6, 0.3]])
def test_acceptance_statistics(target, acceptance):
    drafter = SyntheticDrafter(acceptance, seed=1)
    out = generate(target, target.encode("x"), drafter=drafter, controller=FixedK(3), max_new_tokens=3000)
    rates = [acceptance] * 3 if isinstance(acceptance, float) else acceptance
    for got, want in zip(conditional_acceptance(out.stats), rates): assert got == pytest.approx(want, abs=0.05)
    assert drafter.forwards == out.stats.proposed
    runs = [generate(target, target.encode("x"), drafter=drafter, controller=FixedK(3), max_new_tokens=300).stats
            for _ in range(2)]
    assert runs[0].accepted_hist == runs[1].accepted_hist and runs[0].draft_forwards == runs[1].draft_forwards   # start() reseeds


VERIFY = {1: 0.003, 2: 0.0035, 4: 0.0045, 8: 0.0065}   # seconds of the synthetic target's forward over q tokens


@pytest.mark.parametrize("acceptance, k", [(0.8, 4), (0.3, 2), (0.95, 8)])
def test_predicted_speedup_matches(acceptance, k, virtual_clock):
    """The cost model, fed costs measured as the benchmark measures them, predicts the speedup the loop shows (on a
    virtual clock: the synthetic costs are the only time that passes, so the check holds on a loaded machine)."""
    target = SyntheticTarget(verify_cost=VERIFY)
    drafter = SyntheticDrafter(acceptance, draft_cost=0.0005)
    prompt = target.encode("a b c d")
    decode_time = lambda out: out.stats.wall_time - out.stats.prefill_time
    plain = generate(target, prompt, max_new_tokens=200)
    spec = generate(target, prompt, drafter=drafter, controller=FixedK(k), max_new_tokens=200)
    assert spec.tokens.equal(plain.tokens)
    measured = (spec.stats.new_tokens / decode_time(spec)) / (plain.stats.new_tokens / decode_time(plain))
    costs = measure_step_costs(target, drafter, context=16, q_values=(1, 2, 4, 8), repeats=3)
    assert costs.draft == pytest.approx(0.0005) and all(costs.verify[q] == pytest.approx(t) for q, t in VERIFY.items())
    predicted = predicted_speedup(StepCosts(costs.verify, costs.draft, 0.0), [acceptance], k)
    assert measured == pytest.approx(predicted, rel=0.12)         # deterministic: a seeded drafter, a virtual clock
    flat = StepCosts({q: costs.verify[1] for q in costs.verify}, costs.draft, 0.0)   # wrong: a wider verify costs nothing
    assert measured != pytest.approx(predicted_speedup(flat, [acceptance], k), rel=0.12)   # the check can fail


def test_target_needs_no_special_case():
    "The synthetic target goes through the same paths as a model: its own net, a tokenizer, ordinary prompt encoding."
    from specdec.prompts import load_prompts
    target = SyntheticTarget()
    p = load_prompts(categories="qa", n_prompts=1)[0]
    assert p.encode(target).equal(target.truth(0, len(p.plain_text().split())))
    assert target.tokenizer.decode(target.tokenizer.encode("a b")) == target.decode(target.truth(0, 2))


def test_sleeps_and_overflow():
    net = SyntheticNet(verify_cost=lambda q: 0.001 * q)
    cache = net.new_cache(1, 6)
    logits = net(torch.zeros(1, 4, dtype=torch.long), cache).logits
    assert logits.shape == (1, 4, 64) and logits.argmax(-1)[0].tolist() == [truth(p, 64) for p in range(1, 5)]
    assert net(torch.zeros(1, 1, dtype=torch.long), cache, logits="none").logits is None and cache.length == 5
    with pytest.raises(ValueError, match="KV cache overflow"): net(torch.zeros(1, 2, dtype=torch.long), cache)
    cache.rollback(2)
    assert net(torch.zeros(1, 2, dtype=torch.long), cache, logits="last").logits.argmax(-1).tolist() == [[truth(4, 64)]]


def test_drafter_errors(target):
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"): SyntheticDrafter(1.5)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"): SyntheticDrafter([])
    with pytest.raises(RuntimeError, match="before start"): SyntheticDrafter(0.5).propose(target.encode("a"), 2)
    assert SyntheticDrafter([0.9, 0.5]).name == "synthetic:0.9/0.5"   # its spec
