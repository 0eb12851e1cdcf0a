"Greedy speculative decoding equals the target's own greedy decoding, token for token, on tiny models."
import pytest, torch
from specdec import generate
from specdec.drafters import PromptLookup, DraftModel, LayerSkip
from specdec.controllers import FixedK, AdaptiveK, CostAwareK
from specdec.policies import RejectionSampling
from conftest import hf_greedy

TEXTS = ["the cat sat on the mat; the cat sat on the", "def add(a, b):\n    return a + b\n\ndef add(",
         "1, 2, 3, 4, 5, 6, 7, 8,", "abcabcabcabc", "Q: What is the capital of France?\nA:", "x",
         "lorem ipsum dolor sit amet, lorem ipsum", "translate: bonjour le monde -> hello world; bonjour ->",
         "[1] The report says revenue rose. Summary: the report says", "zzzzzzzzzzzzzzzzzzzzzzzzzzzz",
         "A B C D A B C D A B", "Once upon a time there was"]


def drafters(tiny, tiny_draft):
    return [PromptLookup(), PromptLookup(max_ngram=1), DraftModel(tiny_draft), LayerSkip(tiny, 2), LayerSkip(tiny, 1)]


@pytest.mark.parametrize("k", [1, 4, 8])
def test_greedy_equals_hf_for_every_drafter(tiny, tiny_draft, k):
    for text in TEXTS:
        prompt = tiny.encode(text)
        ref = hf_greedy(tiny, prompt, 48)
        for drafter in drafters(tiny, tiny_draft):
            out = generate(tiny, prompt, drafter=drafter, controller=FixedK(k), max_new_tokens=48)
            assert out.tokens.shape == ref.shape, (text, drafter.name)
            assert torch.equal(out.tokens, ref), (text, drafter.name, k)


def test_autoregressive_loop_equals_hf(tiny):
    for text in TEXTS:
        prompt = tiny.encode(text)
        assert torch.equal(generate(tiny, prompt, max_new_tokens=48).tokens, hf_greedy(tiny, prompt, 48))


def test_adaptive_k_and_rejection_sampling_at_t0_are_greedy(tiny, tiny_draft):
    for text in TEXTS[:6]:
        prompt = tiny.encode(text)
        ref = hf_greedy(tiny, prompt, 40)
        for drafter in drafters(tiny, tiny_draft):
            out = generate(tiny, prompt, drafter=drafter, controller=AdaptiveK(k_max=8), max_new_tokens=40)
            assert torch.equal(out.tokens, ref), (text, drafter.name)
            out = generate(tiny, prompt, drafter=drafter, policy=RejectionSampling(), max_new_tokens=40)
            assert torch.equal(out.tokens, ref), (text, drafter.name)
            out = generate(tiny, prompt, drafter=drafter, controller=CostAwareK(k_max=6), max_new_tokens=40)
            assert torch.equal(out.tokens, ref), (text, drafter.name)


def _eos_inside_second_draft(tiny, prompt):
    "A token first emitted at output position 10: with K=8 and full acceptance it is a draft token of step 2."
    plain = hf_greedy(tiny, prompt, 30, eos_token_id=[])[0].tolist()
    for pos in range(9, 17):
        if plain[pos] not in plain[:pos]: return plain[pos], pos
    return None, None


def test_eos_inside_a_draft(tiny):
    self_draft = DraftModel(tiny)   # drafts exactly what the target says: every draft is accepted
    checked = 0
    for text in TEXTS:
        prompt = tiny.encode(text)
        eos, pos = _eos_inside_second_draft(tiny, prompt)
        if eos is None: continue
        ref = hf_greedy(tiny, prompt, 30, eos_token_id=eos)
        for drafter in (self_draft, PromptLookup(), LayerSkip(tiny, 2)):
            out = generate(tiny, prompt, drafter=drafter, controller=FixedK(8), max_new_tokens=30, eos_token_id=eos)
            assert torch.equal(out.tokens, ref), (text, drafter.name)
            assert out.tokens.shape[1] == pos + 1 and out.tokens[0, -1].item() == eos
        out = generate(tiny, prompt, drafter=self_draft, controller=FixedK(8), max_new_tokens=30, eos_token_id=eos)
        assert out.stats.accepted > out.stats.new_tokens - out.stats.target_forwards   # drafts past the EOS were dropped
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("max_new", [1, 2, 5, 9, 12, 17])
def test_max_new_tokens_reached_inside_a_draft(tiny, max_new):
    self_draft = DraftModel(tiny)
    for text in TEXTS[:6]:
        prompt = tiny.encode(text)
        ref = hf_greedy(tiny, prompt, max_new, eos_token_id=[])
        for drafter in (self_draft, PromptLookup(), LayerSkip(tiny, 2)):
            out = generate(tiny, prompt, drafter=drafter, controller=FixedK(8), max_new_tokens=max_new, eos_token_id=[])
            assert out.tokens.shape[1] == max_new
            assert torch.equal(out.tokens, ref), (text, drafter.name)


def test_draft_model_is_reusable_across_prompts(tiny, tiny_draft):
    drafter = DraftModel(tiny_draft)
    for text in TEXTS[:4] + TEXTS[:2]:
        prompt = tiny.encode(text)
        assert torch.equal(generate(tiny, prompt, drafter=drafter, max_new_tokens=24).tokens, hf_greedy(tiny, prompt, 24))
