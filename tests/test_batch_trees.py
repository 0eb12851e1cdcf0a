"""Token trees at batch size B > 1: each row drafts its own tree (its own topology), the rows' trees padded to one
rectangular block, verified in one target forward (each node sees its row's cache and its own ancestors, at its row's
length + depth), each row's accepted branch kept at its own positions. Every row's greedy output is its own batch-1
output (and plain autoregressive decoding's); padded nodes are never accepted; a sampled row does not depend on the rows
beside it."""
from pathlib import Path
import pytest, torch
from specdec import generate
from specdec.controllers import FixedK
from specdec.decode import Batch, _prompts as padded_prompts
from specdec.net import TreeLayout
from specdec.policies import Greedy, RejectionSampling
from specdec.sampling import RowGenerators, logits_to_probs, SamplingConfig
from specdec.specs import make_drafter
from specdec.trees import TokenTree, grow_tree_on_device
from test_batch import _prompts
from test_trees import _walk_law

HEADS = Path(__file__).resolve().parent / "fixtures" / "heads"
TREES = [f"eagle-tree:2:4:{HEADS}/eagle-tiny", f"eagle3-tree:3:6:{HEADS}/eagle3-tiny",
         f"medusa-tree:2:5:{HEADS}/medusa-tiny"]


@pytest.fixture(scope="module")
def trees(tiny): return {spec.split(":")[0]: make_drafter(spec, tiny) for spec in TREES}


@pytest.mark.parametrize("B", [2, 4])
def test_each_rows_tree_output_is_its_own_batch_1_output(tiny, trees, B):
    prompts = _prompts(tiny, B)
    assert len({p.numel() for p in prompts}) == B                                 # ragged
    plain = [generate(tiny, p, max_new_tokens=20, eos_token_id=[]).tokens[0] for p in prompts]   # --drafter none
    for name, tree in trees.items():
        alone = [generate(tiny, p, drafter=tree, controller=FixedK(3), max_new_tokens=20, eos_token_id=[]).tokens[0]
                 for p in prompts]
        out = generate(tiny, prompts, drafter=tree, controller=FixedK(3), max_new_tokens=20, eos_token_id=[])
        assert all(torch.equal(p, a) for p, a in zip(plain, alone)), name
        assert all(torch.equal(p, t) for p, t in zip(plain, out.tokens)), name
        assert [rs.new_tokens for rs in out.row_stats] == [20] * B
        assert out.stats.accepted > 0, name                                       # the trees' branches were kept
        assert max(max(a) for a in out.accepted_lengths) <= 3                     # K is each tree's depth


def test_the_rows_trees_are_each_rows_own(tiny, trees):
    "A row's tree in the batch is the tree it drafts alone (the same nodes and parents), and the rows' trees differ."
    prompts = _prompts(tiny, 3)
    for name, tree in trees.items():
        drafts = []
        for rows in [[p] for p in prompts] + [prompts]:
            prompt, lengths, _ = padded_prompts(rows, tiny.device)
            batch = Batch(tiny, len(rows), prompt.shape[1] + 8, tree, eos_token_id=[])
            batch.start(prompt, lengths, 4)
            batch.step()                                                          # the heads have features to read
            rows_lengths = {} if len(rows) == 1 else {"lengths": batch.lengths}
            with torch.inference_mode(): drafts.append(tree.propose(batch.tokens[:, :max(batch.lengths)], 3,
                                                                    **rows_lengths))
        together = drafts[-1]
        assert together.tokens.shape[0] == 3 and together.parents.shape == together.tokens.shape
        for b, alone in enumerate(drafts[:-1]):
            assert torch.equal(alone.tokens[0], together.tokens[b]), (name, b)
            assert torch.equal(alone.parents, together.parents[b]), (name, b)
            assert torch.equal(alone.layout.ancestors, together.layout.ancestors[b]), (name, b)
        assert not torch.equal(together.tokens[0], together.tokens[1]), name


def test_rows_grown_together_are_the_trees_grown_alone():
    "`grow_tree_on_device` over rows: each row's tree (topology included) is the one grown from its scores alone."
    g = torch.Generator().manual_seed(0)
    B, N, full_ids = 3, 9, torch.arange(9) * 2
    first = torch.randn(B, N, generator=g)                                         # [B, N]
    table = torch.randn(B, 4 * N, N, generator=g)                                  # [B, token, N] each row's scores
    together = grow_tree_on_device(first, lambda d, tokens, rows: table[torch.arange(B)[:, None], tokens], 3, 3, 7,
                                   full_ids)
    parents = set()
    for b in range(B):
        alone = grow_tree_on_device(first[b], lambda d, tokens, rows: table[b, tokens], 3, 3, 7, full_ids)
        assert torch.equal(alone.tokens[0], together.tokens[b]) and torch.equal(alone.parents, together.parents[b])
        assert torch.equal(alone.layout.depths, together.layout.depths[b])
        assert torch.equal(alone.layout.ancestors, together.layout.ancestors[b])
        parents.add(tuple(alone.parents.tolist()))
    assert len(parents) > 1                                                        # the rows' topologies differ


class _Padded(TokenTree):
    "A token tree whose rows keep only their first `valid[step % len][b]` nodes (the rest: padding, `n_valid`)."
    def __init__(self, tree, valid):
        super().__init__(tree.head, tree.width, tree.nodes)
        self.valid, self.steps = valid, 0
    def propose(self, tokens, k, sampling=SamplingConfig(), generator=None, lengths=None):
        draft = super().propose(tokens, k, sampling, generator, lengths)
        if draft.parents is None or draft.tokens.shape[0] == 1: return draft
        valid = self.valid[self.steps % len(self.valid)][:tokens.shape[0]]     # the rows this step decodes
        self.steps += 1
        draft.n_valid = torch.tensor(valid, device=tokens.device).clamp(max=draft.k)
        return draft


def test_rows_with_small_or_empty_trees_keep_their_own_output(tiny, trees):
    "Rows whose trees are padded (some empty) decode their plain output; a row with an empty tree accepts nothing."
    prompts = _prompts(tiny, 4)
    plain = [generate(tiny, p, max_new_tokens=20, eos_token_id=[]).tokens[0] for p in prompts]
    for name in ("eagle-tree", "medusa-tree"):
        tree = _Padded(trees[name], [[0, 99, 99, 99], [0, 99, 1, 2], [0, 2, 99, 0]])   # row 0: never a node
        out = generate(tiny, prompts, drafter=tree, controller=FixedK(3), max_new_tokens=20, eos_token_id=[])
        assert all(torch.equal(p, t) for p, t in zip(plain, out.tokens)), name
        assert set(out.accepted_lengths[0]) == {0} and out.row_stats[0].proposed == 0, name
        assert out.stats.accepted > 0, name


def test_padded_nodes_are_never_accepted():
    "A padded node that equals the target's choice is not accepted (greedy and sampled); the same node unpadded is."
    parents = torch.tensor([[-1, -1, 0], [-1, 0, 1]])                            # [B, k] two rows, two topologies
    drafts = torch.tensor([[3, 4, 5], [4, 6, 2]])                                # [B, k]
    layout = TreeLayout.on_device(torch.cat([torch.full((2, 1), -1), parents + 1], 1), 3)
    logits = torch.full((2, 4, 8), -30.0)                                          # [B, q, V] the target's
    logits[0, 0, 4] = logits[0, 2, 1] = logits[1, 0, 4] = logits[1, 1, 6] = logits[1, 2, 2] = 30.0
    for policy, sampling in ((Greedy(), SamplingConfig()), (RejectionSampling(), SamplingConfig(1.0))):
        gen = RowGenerators([0, 1], "cpu")
        n, path, _ = policy.verify_tree_on_device(drafts, layout, logits, sampling, gen)
        assert n.tolist() == [1, 3] and path[0, 0] == 2 and path[1].tolist() == [1, 2, 3]
        n, path, next_token = policy.verify_tree_on_device(drafts, layout, logits, sampling, gen,
                                                           n_valid=torch.tensor([1, 2]))
        # row 0's node 2 and row 1's node 3 padded
        assert n.tolist() == [0, 2] and next_token.tolist() == [4, 2]


def test_rows_that_finish_early_stop_while_the_others_go_on(tiny, trees):
    "A row at its EOS, and one at its budget, stop; the others decode on, each its plain output."
    prompts = _prompts(tiny, 3)
    plain = [generate(tiny, p, max_new_tokens=20, eos_token_id=[]).tokens[0] for p in prompts]
    eos = int(plain[0][4])                                                         # row 0 meets it 5th (or sooner)
    for name, tree in trees.items():
        prompt, lengths, _ = padded_prompts(prompts, tiny.device)
        batch = Batch(tiny, 3, prompt.shape[1] + 20, tree, controller=FixedK(3), eos_token_id=eos)
        batch.start(prompt, lengths, [20, 20, 6])
        steps = 0
        while not all(batch.done): batch.step(); steps += 1
        out = batch.finish()
        for b, (p, t) in enumerate(zip(plain, out.tokens)):
            cut = (p == eos).nonzero()
            expect = p if cut.numel() == 0 else p[:int(cut[0]) + 1]
            assert torch.equal(t, expect[:6] if b == 2 else expect), (name, b)
        assert out.tokens[0].numel() <= 5 and len(out.accepted_lengths[0]) < steps, name   # it stopped early


def test_a_sampled_row_with_trees_does_not_depend_on_its_neighbours(tiny, trees):
    """Row 0 (its own seed) samples the same tokens beside one prompt or beside three others; alone with the same seed,
    the same tokens up to where one row's tree is cut to its budget (a row alone drafts no deeper than it may keep)."""
    prompts, accepted = _prompts(tiny, 4), 0
    for name, tree in trees.items():
        kw = dict(drafter=tree, controller=FixedK(3), max_new_tokens=20, temperature=0.9, eos_token_id=[], seed=7)
        two = generate(tiny, prompts[:2], **kw)
        four = generate(tiny, [prompts[0], prompts[3], prompts[2], prompts[1]], **kw)
        alone = generate(tiny, prompts[0], **kw).tokens[0]
        assert torch.equal(two.tokens[0], four.tokens[0]), name
        assert torch.equal(alone[:16], four.tokens[0][:16]), name                  # depth 3: cut only past 20-1-3
        assert not torch.equal(two.tokens[1], four.tokens[1]), name               # the neighbours themselves differ
        accepted += four.stats.accepted
    assert accepted > 0                                                            # trees' branches were sampled


def _law_pvalue(counts:dict, law:dict, runs:int) -> float:
    "Chi-square p-value of `counts` of what was emitted against `law` (outcomes expected under 5 times pooled)."
    from scipy.stats import chisquare
    big = [k for k in law if law[k] * runs >= 5]
    observed = [counts.get(k, 0) for k in big] + [runs - sum(counts.get(k, 0) for k in big)]
    expected = [law[k] * runs for k in big] + [runs * (1 - sum(law[k] for k in big))]
    return chisquare(observed, expected).pvalue


class HostWalk(RejectionSampling):
    "Rejection sampling with a child test of its own (the same rule): its trees are walked on the host, row by row."
    def accept_child(self, probs, token, generator):
        return bool(torch.rand((), device=probs.device, generator=generator) < probs[token])


@pytest.mark.parametrize("walk", ["device", "host"])
def test_rejection_sampling_over_rows_of_trees_follows_each_rows_walk(walk):
    """Rows of different trees verified together emit, each, what the host walk over the row's own tree emits, in law
    (chi-square), each row from its own generator, padding never accepted (row 1's last two nodes), on the device and
    walked on the host row by row (a policy changing a child's test); a row's counts against its neighbour's law:
    rejected."""
    rows = [([-1, -1, -1, 0, 0, 1, 3], [2, 4, 1, 3, 4, 2, 5]), ([-1, 0, 0, -1, 1, 1, 2], [1, 3, 5, 0, 2, 4, 1])]
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 8, 6, generator=g) * 1.5                               # [B, q, V=6]
    sampling, runs, n_valid = SamplingConfig(1.0), 4000, torch.tensor([7, 5])
    parents = torch.tensor([[-1] + [p + 1 for p in ps] for ps, _ in rows])         # [B, q]
    layout, drafts = TreeLayout.on_device(parents, 4), torch.tensor([d for _, d in rows])
    laws = [_walk_law(ps[:m], d[:m], logits_to_probs(logits[b:b + 1], sampling)[0])
            for b, ((ps, d), m) in enumerate(zip(rows, n_valid.tolist()))]
    policy = RejectionSampling() if walk == "device" else HostWalk()
    assert policy.verifies_trees_on_device == (walk == "device")
    verify = policy.verify_tree_on_device if walk == "device" else policy.verify_trees_on_host
    counts, gen = [{}, {}], RowGenerators([11, 12], "cpu")
    for _ in range(runs):
        n, path, next_token = verify(drafts, layout, logits, sampling, gen, n_valid=n_valid)
        for b in range(2):
            emitted = tuple(drafts[b, path[b, :n[b]] - 1].tolist()) + (int(next_token[b]),)
            counts[b][emitted] = counts[b].get(emitted, 0) + 1
    for b in range(2):
        assert set(counts[b]) <= set(laws[b]) and _law_pvalue(counts[b], laws[b], runs) > 1e-3, (walk, b)
    assert _law_pvalue(counts[1], laws[0], runs) < 1e-6                           # the negative control


def test_a_policy_walking_trees_on_the_host_samples_rows_of_trees(tiny, trees):
    """A policy whose trees are walked on the host decodes rows of trees: greedy, each row its plain output; sampled,
    row 0 (its own seed) the same beside one prompt or three, and alone up to where its tree is cut to its budget."""
    prompts = _prompts(tiny, 4)
    plain = [generate(tiny, p, max_new_tokens=20, eos_token_id=[]).tokens[0] for p in prompts]
    for name, tree in trees.items():
        kw = dict(drafter=tree, policy=HostWalk(), controller=FixedK(3), max_new_tokens=20, eos_token_id=[])
        greedy = generate(tiny, prompts, **kw)
        assert all(torch.equal(p, t) for p, t in zip(plain, greedy.tokens)) and greedy.stats.accepted > 0, name
        kw.update(temperature=0.9, seed=7)
        two = generate(tiny, prompts[:2], **kw)
        four = generate(tiny, [prompts[0], prompts[3], prompts[2], prompts[1]], **kw)
        alone = generate(tiny, prompts[0], **kw).tokens[0]
        assert torch.equal(two.tokens[0], four.tokens[0]) and not torch.equal(two.tokens[1], four.tokens[1]), name
        assert torch.equal(alone[:16], four.tokens[0][:16]), name                  # depth 3: cut only past 20-1-3


def test_rows_of_trees_at_fixed_shapes_keep_each_rows_tokens(tiny, trees):
    """The fixed-shape engine (the CUDA graphs' path, its tree step `[B, q]` depths and `[B, q, q]` masks) verifies the
    rows' trees as the eager forward does: the same tokens, the same accepted branches."""
    prompts = _prompts(tiny, 3)
    for name in ("eagle-tree", "medusa-tree"):
        kw = dict(drafter=trees[name], controller=FixedK(3), max_new_tokens=16, eos_token_id=[])
        eager, fixed = generate(tiny, prompts, compile="eager", **kw), generate(tiny, prompts, compile="fixed", **kw)
        assert all(torch.equal(a, b) for a, b in zip(eager.tokens, fixed.tokens)), name
        assert fixed.accepted_lengths == eager.accepted_lengths and fixed.engine["mode"] == "fixed", name


def test_a_prompt_admitted_into_a_running_batch_of_trees_decodes_its_own_output(tiny, trees):
    "A row released and a new prompt admitted between two steps (continuous batching): each its plain output."
    prompts = _prompts(tiny, 3)
    plain = [generate(tiny, p, max_new_tokens=12, eos_token_id=[]).tokens[0] for p in prompts]
    for name in ("eagle-tree", "medusa-tree"):
        prompt, lengths, _ = padded_prompts(prompts[:2], tiny.device)
        batch = Batch(tiny, 2, 64, trees[name], controller=FixedK(3), eos_token_id=[])
        batch.start(prompt, lengths, [4, 12])
        while not batch.done[0]: batch.step()
        first, _ = batch.release(0)
        assert batch.admit(prompts[2], 12) == 0
        while not all(batch.done): batch.step()
        assert torch.equal(first, plain[0][:4]), name
        assert torch.equal(batch.output(1), plain[1]) and torch.equal(batch.output(0), plain[2]), name


JOINED = [f"pld:3:2+eagle-tree:2:4:{HEADS}/eagle-tiny", "suffix-tree:6", f"suffix+medusa-tree:2:5:{HEADS}/medusa-tiny"]


@pytest.mark.parametrize("B", [2, 4])
def test_joined_and_host_drafted_trees_decode_each_rows_own_output(tiny, B, monkeypatch):
    """At B > 1: prompt lookup's chain in the rows where it drafts and the head's tree in the others, in one block of
    trees; SuffixDecoding's trees drafted on the host per row; every row its batch-1 (and plain) output. Rows of one
    step did take a chain and a tree side by side."""
    import specdec.drafters as drafters
    prompts = _prompts(tiny, B)
    plain = [generate(tiny, p, max_new_tokens=20, eos_token_id=[]).tokens[0] for p in prompts]
    mixed, merge = [], drafters._merge_trees
    def seen(first, second):
        out = merge(first, second)
        chain = (first.parents is None) & (first.n_valid > 0) if first.n_valid is not None else None
        if chain is not None and bool(chain.any()) and not bool(chain.all()): mixed.append(first.tokens.shape[0])
        return out
    monkeypatch.setattr(drafters, "_merge_trees", seen)
    for spec in JOINED:
        kw = dict(controller=FixedK(3), max_new_tokens=20, eos_token_id=[])
        alone = [generate(tiny, p, drafter=make_drafter(spec, tiny), **kw).tokens[0] for p in prompts]
        out = generate(tiny, prompts, drafter=make_drafter(spec, tiny), **kw)
        assert all(torch.equal(p, a) for p, a in zip(plain, alone)), spec
        assert all(torch.equal(p, t) for p, t in zip(plain, out.tokens)), spec
    assert mixed                                                                  # a chain beside a tree


def test_a_joined_tree_samples_each_row_from_its_own_generator(tiny):
    """Sampled, `pld+eagle-tree`'s row 0 is the same beside one neighbour or three; so is it where a head's sampled
    chain (drawn from its distribution) fills in for a tree's rows as one-hot nodes."""
    prompts = _prompts(tiny, 4)
    kw = dict(controller=FixedK(3), max_new_tokens=20, temperature=0.9, eos_token_id=[], seed=7)
    sampled = f"pld:3:2+eagle:{HEADS}/eagle-tiny+eagle-tree:2:4:{HEADS}/eagle-tiny"
    for spec in (JOINED[0], sampled):
        two = generate(tiny, prompts[:2], drafter=make_drafter(spec, tiny), **kw)
        four = generate(tiny, [prompts[0], prompts[3], prompts[2], prompts[1]], drafter=make_drafter(spec, tiny), **kw)
        assert torch.equal(two.tokens[0], four.tokens[0]) and not torch.equal(two.tokens[1], four.tokens[1]), spec
        assert four.stats.accepted > 0, spec
    greedy = generate(tiny, prompts, drafter=make_drafter(sampled, tiny), controller=FixedK(3), max_new_tokens=20,
                      eos_token_id=[])
    plain = [generate(tiny, p, max_new_tokens=20, eos_token_id=[]).tokens[0] for p in prompts]
    assert all(torch.equal(p, t) for p, t in zip(plain, greedy.tokens))


def test_a_sampled_chain_filling_in_for_a_tree_keeps_the_targets_law():
    """A chain drawn from a distribution q, joined to a batch of trees as one-hot nodes (its q dropped), emits its first
    token with the target's law p (chi-square over 6,000 verifications, a fresh chain each), the tree beside it in its
    own row; the same counts against q (what accepting the drafts unchecked would give): rejected."""
    from specdec.drafters import Draft, tree_draft, _merge
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 4, 6, generator=g) * 1.5                               # [B, K+1, V=6] the target
    q = torch.softmax(torch.randn(3, 6, generator=g) * 2, -1)                      # [K, V] the chain's drafter
    sampling, runs = SamplingConfig(1.0), 6000
    tree = tree_draft(torch.tensor([[2, 4, 1], [0, 0, 0]]), torch.tensor([[-1, -1, 0], [-1, -1, -1]]),
                      torch.tensor([3, 0]))                                         # row 1: no tree
    p = logits_to_probs(logits[1:2, :1], sampling)[0, 0]                           # [V] the target's first token
    counts, gen, draws = {}, RowGenerators([21, 22], "cpu"), torch.Generator().manual_seed(9)
    for _ in range(runs):
        chain = torch.multinomial(q, 1, generator=draws).T.expand(2, 3)            # [B, K] drawn from q
        merged = _merge(tree, Draft(chain, q[None].expand(2, -1, -1)))
        assert merged.probs is None and merged.parents[1].tolist() == [-1, 0, 1]  # row 1: the chain, one-hot
        n, path, next_token = RejectionSampling().verify_tree_on_device(merged.tokens, merged.layout, logits,
                                                                        sampling, gen, n_valid=merged.n_valid)
        first = int(merged.tokens[1, path[1, 0] - 1]) if n[1] > 0 else int(next_token[1])
        counts[(first,)] = counts.get((first,), 0) + 1
    law = {(t,): float(v) for t, v in enumerate(p)}
    assert _law_pvalue(counts, law, runs) > 1e-3
    assert _law_pvalue(counts, {(t,): float(v) for t, v in enumerate(q[0])}, runs) < 1e-6   # the negative control
