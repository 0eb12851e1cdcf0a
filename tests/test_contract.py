"""The drafter contract: a drafter written against what `Drafter` declares, and nothing else, runs in chains, token trees
and `Fallback`, on the eager net and on the fixed-shape engine (with CUDA-graph buffers emulated), and is handed exactly
the target's features of every committed position; the loop reaching for an undeclared member fails the test."""
import random
import pytest, torch
from specdec import generate
from specdec.drafters import Draft, Drafter, Fallback, PromptLookup, no_draft
from specdec.controllers import FixedK
from specdec.policies import Greedy
from conftest import hf_greedy
from test_lossless_tiny import TEXTS
from test_engine import GraphBuffers

DECLARED = frozenset(n for n in dir(Drafter) if not n.startswith("_"))   # what the loop may ask of a drafter


class ContractDouble(Drafter):
    """Drafts the target's own greedy continuation (`reference`), each draft right with probability 0.7 (else the next id),
    as a chain, or as a tree giving every chain node a wrong sibling; reads two target layers and keeps every feature
    block it is handed. Any public member it does not share with `Drafter` raises: the loop may use the contract only."""
    def __init__(self, reference:list, # [S + n] the prompt and the target's greedy output
                 vocab_size:int, layers=(0, 1), tree:bool=False, seed:int=0):
        self._reference, self._vocab, self._tree, self._seed = reference, vocab_size, tree, seed
        self.target_layers, self.drafts_trees = tuple(layers), tree

    def __getattribute__(self, name):
        if not name.startswith("_") and name not in DECLARED:
            raise AssertionError(f"the loop reached for {name!r}, which Drafter does not declare")
        return object.__getattribute__(self, name)

    def max_drafts(self, k): return 2 * k if self._tree else k

    def start(self, target, prompt_ids, capacity, features=None):
        super().start(target, prompt_ids, capacity, features)
        self._rng, self._next = random.Random(self._seed), prompt_ids.shape[1] - 1   # the first position not yet handed
        self._blocks = [] if features is None else [(0, features)]

    def propose(self, tokens, k, sampling, generator=None):
        L = tokens.shape[1]
        right = self._reference[L:L + k]
        if not right: return no_draft(tokens)
        chain = [t if self._rng.random() < 0.7 else (t + 1) % self._vocab for t in right]
        self.forwards += 1
        if not self._tree: return Draft(torch.tensor([chain], device=tokens.device))
        nodes, parents = [], []
        for i, t in enumerate(chain):                                  # node 2i: the chain's; node 2i+1: a wrong sibling
            parent = 2 * (i - 1) if i else -1
            nodes += [t, (self._reference[L + i] + 2) % self._vocab]; parents += [parent, parent]
        return Draft(torch.tensor([nodes], device=tokens.device), parents=parents)

    def observe(self, n_accepted, features=None):
        assert features is not None and features.shape[:2] == (1, n_accepted + 1), (n_accepted, features)
        self._blocks.append((self._next, features.clone()))
        self._next += n_accepted + 1

    def _handed(self) -> torch.Tensor:
        "Every feature block it was handed, joined `[1, positions, F]` (checking they follow one another)."
        at = 0
        for start, block in self._blocks:
            assert start == at, (start, at)
            at += block.shape[1]
        return torch.cat([b for _, b in self._blocks], 1)


def test_the_double_refuses_what_drafter_does_not_declare():
    "Negative control: a probe of an undeclared member (as the loop once did) fails, with or without a default."
    double = ContractDouble([1, 2, 3], 64)
    for probe in (lambda: double.reads_target_features, lambda: getattr(double, "runner", None),
                  lambda: hasattr(double, "drafters")):
        with pytest.raises(AssertionError, match="which Drafter does not declare"): probe()
    assert double.target_layers == (0, 1) and double.members == (double,) and double.runners() == []


@pytest.mark.parametrize("shape", ["chain", "tree", "fallback-chain", "fallback-tree"])
@pytest.mark.parametrize("compile", ["eager", "fixed"])
def test_a_drafter_written_against_the_contract_alone_runs_everywhere(tiny, shape, compile):
    """Greedy output equals Hugging Face's; some drafts are accepted; the features handed to `start` and `observe` are the
    target's own (an eager forward over the final sequence) at every committed position, in order; under `fixed` the
    engine's steps overwrite their outputs as CUDA graphs do (`GraphBuffers`)."""
    layers = (0, tiny.num_layers - 1)
    for text in TEXTS[:3]:
        prompt = tiny.encode(text)
        n_new = 24
        ref = hf_greedy(tiny, prompt, n_new, eos_token_id=[])
        reference = prompt[0].tolist() + ref[0].tolist()
        double = ContractDouble(reference, tiny.vocab_size, layers, tree=shape.endswith("tree"))
        drafter = Fallback([PromptLookup(3, 2), double]) if shape.startswith("fallback") else double
        with GraphBuffers():
            out = generate(tiny, prompt, drafter=drafter, policy=Greedy(), controller=FixedK(3), max_new_tokens=n_new,
                           eos_token_id=[], compile=compile)
        assert torch.equal(out.tokens, ref), (shape, compile, text)
        assert out.stats.accepted > 0 and out.stats.missing_features == 0
        handed = double._handed()                                                    # [1, S + n - 1, 2H]
        with torch.inference_mode():
            seq = torch.tensor([reference[:prompt.shape[1] + n_new - 1]])
            truth = tiny.net(seq, tiny.net.new_cache(1, seq.shape[1]), logits="none", keep=layers).features
        assert handed.shape == truth.shape
        # float32 over other matmul shapes (the fixed engine pads its steps): 1.2e-4 seen on an AVX2 host; a feature
        # from another position differs by O(1) (the negative control below)
        torch.testing.assert_close(handed, truth, atol=1e-3, rtol=1e-3)
        assert (handed[:, 1:] - truth[:, :-1]).abs().max() > 1e-2                  # one position off: far apart


@pytest.mark.parametrize("shape", ["chain", "tree", "suffix+double"])
@pytest.mark.parametrize("compile", ["eager", "fixed"])
def test_suffix_decoding_runs_on_the_contract_eager_and_fixed(tiny, shape, compile):
    """SuffixDecoding (a model-free drafter that learns across generations through `finish`) in chains, trees and ahead
    of a head in `Fallback`: output equals Hugging Face's under both modes, and the head behind it is still handed the
    target's features at every committed position, including the steps the suffix index drafted."""
    from specdec.suffix import SuffixDecoding
    layers, suffix = (0, tiny.num_layers - 1), SuffixDecoding(tree_nodes=5 if shape == "tree" else 0, min_score=1.0)
    drafted = 0
    for text in TEXTS[:4] + TEXTS[:2]:                  # the repeats draft from the cache of the first outputs
        prompt, n_new = tiny.encode(text), 24
        ref = hf_greedy(tiny, prompt, n_new, eos_token_id=[])
        double = ContractDouble(prompt[0].tolist() + ref[0].tolist(), tiny.vocab_size, layers)
        drafter = Fallback([suffix, double]) if shape == "suffix+double" else suffix
        with GraphBuffers():
            out = generate(tiny, prompt, drafter=drafter, policy=Greedy(), controller=FixedK(3), max_new_tokens=n_new,
                           eos_token_id=[], compile=compile)
        assert torch.equal(out.tokens, ref), (shape, compile, text)
        drafted += suffix.counters["drafts"]
        if shape == "suffix+double":
            assert drafter.usage[0]["steps"] == suffix.counters["drafts"]
            handed = double._handed()
            assert handed.shape[1] == prompt.shape[1] + n_new - 1
    assert drafted > 0 and suffix.cache.sequences == 6
