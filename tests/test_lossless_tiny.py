"Greedy speculative decoding equals the target's own greedy decoding, token for token, on tiny models."
import pytest, torch
from specdec import generate
from specdec.drafters import PromptLookup, DraftModel, LayerSkip
from specdec.controllers import FixedK, AdaptiveK, CostAwareK, DynamicK
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
            out = generate(tiny, prompt, drafter=drafter, controller=DynamicK(6, stop_below=0.2), max_new_tokens=40)
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
        # τ counts only tokens emitted up to the EOS: drafts the self-draft accepted past it are not counted
        assert out.stats.accepted == out.stats.new_tokens - out.stats.target_forwards
        assert sum(out.accepted_lengths) == out.stats.accepted
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


class CountedDraft(DraftModel):
    "A DraftModel that records, for each propose, its k and the tokens fed to each draft forward (a hook on the embedding)."
    def __init__(self, draft):
        super().__init__(draft)
        self.ks, self.fed = [], []
    def propose(self, tokens, k, *args, **kw):
        self.ks.append(k); self.fed.append([])
        return super().propose(tokens, k, *args, **kw)
    def record(self, module, args, output):
        if self.fed: self.fed[-1].append(args[0].shape[1])


def check_draft_forwards(drafter, out, prompt_len):
    """k forwards per step for k drafts; the first forward of a step feeds only what the cache lacks: the prompt at
    the first step, then the last emitted token (and the last draft when all drafts were accepted, since the draft
    never fed its own k-th token). Rolling the draft cache back too far shows up as more tokens fed."""
    steps = list(zip(drafter.ks, drafter.fed, out.accepted_lengths))     # k=0 steps (the last token) never propose
    full = []
    for i, (k, fed, n) in enumerate(steps):
        assert len(fed) == k and fed[1:] == [1] * (k - 1), (i, k, fed)
        if i == 0: assert fed[0] == prompt_len
        else: assert 1 <= fed[0] <= 1 + full[-1], (i, fed, full[-1])
        full.append(n == k)
    assert out.stats.draft_forwards == sum(map(len, drafter.fed))
    return full


@pytest.mark.parametrize("k", [1, 3, 6])
def test_draft_model_partial_acceptance_and_forwards_per_step(tiny, tiny_draft, k):
    "A co-seeded draft (the target's weights plus 2% noise) is accepted often but not always; output stays the target's."
    accepted = proposed = 0
    full_steps = []
    drafter = CountedDraft(tiny_draft)
    hook = tiny_draft.model.model.embed_tokens.register_forward_hook(drafter.record)
    try:
        for text in TEXTS:
            prompt = tiny.encode(text)
            drafter.ks, drafter.fed = [], []
            out = generate(tiny, prompt, drafter=drafter, controller=FixedK(k), max_new_tokens=40)
            assert torch.equal(out.tokens, hf_greedy(tiny, prompt, 40)), text
            full_steps += check_draft_forwards(drafter, out, prompt.shape[1])
            accepted, proposed = accepted + out.stats.accepted, proposed + out.stats.proposed
    finally: hook.remove()
    assert 0.1 < accepted / proposed < 0.95, (accepted, proposed)
    assert any(full_steps) and not all(full_steps)          # both rollback paths ran


def test_draft_model_is_reusable_across_prompts(tiny, tiny_draft):
    drafter = DraftModel(tiny_draft)
    for text in TEXTS[:4] + TEXTS[:2]:
        prompt = tiny.encode(text)
        assert torch.equal(generate(tiny, prompt, drafter=drafter, max_new_tokens=24).tokens, hf_greedy(tiny, prompt, 24))
