"""On the real SmolLM2-135M (float32): greedy speculative output equals Hugging Face `generate(do_sample=False)`
token for token and in length, for each lossless drafter and K in {1, 4, 8}, 64 new tokens."""
import pytest, torch
from specdec import generate
from specdec.drafters import PromptLookup, LayerSkip, DraftModel
from specdec.controllers import FixedK, AdaptiveK
from specdec.policies import RejectionSampling
from conftest import hf_greedy

DOC = ("The Amazon rainforest covers much of the Amazon basin of South America. The basin encompasses seven million "
       "square kilometres, of which five and a half million square kilometres are covered by the rainforest. The "
       "region includes territory belonging to nine nations, and Brazil holds 60% of the rainforest.")
PROMPTS = {   # grounded (summarization, RAG, code edit) and open (chat, math)
    "summarization": f"Summarize the following text in two sentences.\n\n{DOC}",
    "rag": f"Context: {DOC}\n\nQuestion: How many nations does the region include, and which holds most of the forest?",
    "code": "Rename the variable x to total in this function:\n\ndef add_all(values):\n    x = 0\n    for v in values:\n        x += v\n    return x",
    "chat": "Give me three tips for staying focused while studying.",
    "math": "If a train travels 60 km in 45 minutes, what is its average speed in km/h? Explain step by step.",
    "translation": "Translate to French: The weather is nice today, so we will walk to the market and buy bread.",
    "copy": "Repeat the following sentence exactly, word for word: The committee approved the new budget for the city "
            "library after a long debate on Tuesday evening.",
}
N_NEW = 64


@pytest.fixture(scope="module")
def references(smol):
    prompts = {name: smol.encode(text, chat=True) for name, text in PROMPTS.items()}
    return {name: (p, hf_greedy(smol, p, N_NEW)) for name, p in prompts.items()}


LAYERSKIP_PROMPTS = ("summarization", "code", "chat")   # grounded and open: its accepted and rejected drafts both run


@pytest.mark.parametrize("k", [1, 4, 8])
@pytest.mark.parametrize("drafter_name", ["pld", "layerskip:8"])
def test_greedy_equals_hf(smol, references, drafter_name, k):
    """Prompt lookup on every prompt; layer-skip (the target's first 8 layers, k forwards a step: the slowest drafter
    here) on three of them."""
    drafter = PromptLookup() if drafter_name == "pld" else LayerSkip(smol, 8)
    names = PROMPTS if drafter_name == "pld" else LAYERSKIP_PROMPTS
    for name in names:
        prompt, ref = references[name]
        out = generate(smol, prompt, drafter=drafter, controller=FixedK(k), max_new_tokens=N_NEW)
        assert out.tokens.shape == ref.shape, name
        assert torch.equal(out.tokens, ref), f"{name}: first difference at {(out.tokens != ref).nonzero()[:1].tolist()}"
        assert out.stats.accepted + out.stats.rejected == out.stats.proposed


def test_autoregressive_loop_equals_hf(smol, references):
    for name, (prompt, ref) in references.items():
        assert torch.equal(generate(smol, prompt, max_new_tokens=N_NEW).tokens, ref), name


@pytest.mark.parametrize("k", [1, 4, 8])
def test_draft_model_equals_hf(smol, smol_draft, references, k):
    """A separate draft model with its own cache: SmolLM2's weights plus noise (co-seeded), accepted often but not
    always, so that both the accept and the rollback paths run; k draft forwards per step, feeding only what its cache
    lacks (see test_lossless_tiny.check_draft_forwards)."""
    from test_lossless_tiny import CountedDraft, check_draft_forwards
    drafter = CountedDraft(smol_draft)
    hook = smol_draft.model.model.embed_tokens.register_forward_hook(drafter.record)
    accepted = proposed = 0
    try:
        for name in ("summarization", "chat"):
            prompt, ref = references[name]
            drafter.ks, drafter.fed = [], []
            out = generate(smol, prompt, drafter=drafter, controller=FixedK(k), max_new_tokens=N_NEW)
            assert torch.equal(out.tokens, ref), name
            check_draft_forwards(drafter, out, prompt.shape[1])
            accepted, proposed = accepted + out.stats.accepted, proposed + out.stats.proposed
    finally: hook.remove()
    assert 0 < accepted < proposed, (accepted, proposed)


def test_adaptive_and_rejection_sampling_at_t0(smol, references):
    for name in ("rag", "code", "chat"):
        prompt, ref = references[name]
        assert torch.equal(generate(smol, prompt, drafter=PromptLookup(), controller=AdaptiveK(),
                                    max_new_tokens=N_NEW).tokens, ref), name
        assert torch.equal(generate(smol, prompt, drafter=LayerSkip(smol, 8), policy=RejectionSampling(),
                                    max_new_tokens=N_NEW).tokens, ref), name


def test_prompt_lookup_accepts_on_grounded_prompts(smol, references):
    "Behaviour, not speed: a copying task gives prompt lookup long accepted drafts; open chat gives it almost none."
    copy = generate(smol, references["copy"][0], drafter=PromptLookup(), controller=FixedK(4), max_new_tokens=N_NEW).stats
    chat = generate(smol, references["chat"][0], drafter=PromptLookup(), controller=FixedK(4), max_new_tokens=N_NEW).stats
    assert copy.tau > 2.5 and copy.acceptance_rate > 0.6
    assert chat.tau < copy.tau


@pytest.mark.parametrize("shape", ["chain", "tree", "suffix+pld"])
def test_suffix_decoding_equals_hf_with_a_warm_cache(smol, references, shape):
    "One drafter for every prompt, in order, so that the later prompts draft from the earlier responses too."
    from specdec.suffix import SuffixDecoding
    from specdec.drafters import Fallback
    drafter = {"chain": SuffixDecoding(), "tree": SuffixDecoding(tree_nodes=6),
               "suffix+pld": Fallback([SuffixDecoding(min_score=1), PromptLookup(3, 2)])}[shape]
    for name, (prompt, ref) in references.items():
        out = generate(smol, prompt, drafter=drafter, controller=FixedK(4), max_new_tokens=N_NEW)
        assert torch.equal(out.tokens, ref), f"{name}: first difference at {(out.tokens != ref).nonzero()[:1].tolist()}"
    assert drafter.members[0].cache.sequences == len(references)
