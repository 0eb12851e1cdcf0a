"""Token trees: the target verifies every branch in one forward (each node sees its ancestors only), the greedy policy keeps
the branch that matches its argmax, the cache keeps that branch where a chain's would be, and the output stays the target's
own greedy output, whether the forward runs eagerly or at fixed shapes (the engine's `fixed`, `compile` and CUDA-graph
modes)."""
import re
import pytest, torch
from specdec import generate
from specdec.net import TreeLayout, attention_mask, tree_attention_mask
from specdec.engine import Engine
from specdec.models import tiny_llama
from specdec.policies import greedy_branch, RejectionSampling, Greedy, Typical
from specdec.sampling import SamplingConfig, logits_to_probs
from specdec.heads import TokenTree, DraftVocab, grow_tree, grow_tree_on_device
from specdec.drafters import Fallback, PromptLookup
from specdec.controllers import FixedK
from specdec.train import new_head, train_head
from specdec.specs import make_drafter, spec_of
from conftest import hf_greedy
from test_lossless_tiny import TEXTS
from test_heads import own_records, small_vocab_target, one_thread, _head_pairs
from test_distribution import V, _chi2_pvalue, _tables
from test_engine import CountSyncs, GraphBuffers
import specdec.decode as decode


def test_tree_layout_depths_and_ancestors():
    #        0
    #      /   \
    #     1     2
    #    / \     \
    #   3   4     5
    layout = TreeLayout([-1, 0, 0, 1, 1, 2])
    assert layout.depths.tolist() == [0, 1, 1, 2, 2, 2]
    assert [row.nonzero().flatten().tolist() for row in layout.ancestors] == [[0], [0, 1], [0, 2], [0, 1, 3], [0, 1, 4], [0, 2, 5]]
    assert TreeLayout.of_draft([-1, -1, 0]).parents == [-1, 0, 0, 1]       # drafts' parents shift by the root
    for bad in ([], [0, 0], [-1, 2, 0], [-1, -1]):
        with pytest.raises(ValueError, match="a token tree lists its root first"): TreeLayout(bad)


def test_greedy_branch_follows_the_targets_argmax():
    parents, drafts = [-1, -1, 0, 1, 3], [7, 8, 9, 5, 6]     # two children of the root (7, 8); 8 -> 5 -> 6; 7 -> 9
    assert greedy_branch(parents, drafts, [8, 0, 5, 0, 6, 1]) == [1, 3, 4]   # root's argmax 8, then 5, then 6
    assert greedy_branch(parents, drafts, [8, 0, 5, 0, 2, 1]) == [1, 3]      # 6 is not the argmax after 5
    assert greedy_branch(parents, drafts, [7, 9, 0, 0, 0, 0]) == [0, 2]
    assert greedy_branch(parents, drafts, [3, 9, 5, 0, 6, 0]) == []          # no child of the root matches
    assert greedy_branch([], [], [4]) == []


def _random_tree(seed, N, depth, width, nodes, ties=False):
    """`grow_tree` and `grow_tree_on_device` on the same random scores: each node's children's log-probabilities are a
    function of its token and its parent's row (`ties`: rounded, so many scores tie)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.log_softmax(torch.randn(N + 1, 7, N, generator=g) * 3, -1)      # [token, parent row, N]
    if ties: table = (table * 2).round() / 2
    full_ids = torch.randperm(500, generator=g)[:N]                                # [N] full ids
    draft_of = {int(t): i for i, t in enumerate(full_ids)}
    logp = lambda tokens, rows: table[torch.tensor([draft_of[int(t)] for t in tokens]), torch.as_tensor(rows) % 7]   # [f, N]
    host = grow_tree(table[N, 0], lambda d, tokens, rows, lineage: logp(tokens, rows), depth, width, nodes, full_ids)
    device = grow_tree_on_device(table[N, 0], lambda d, tokens, rows: logp(tokens, rows), depth, width, nodes, full_ids)
    return host, device


@pytest.mark.parametrize("seed", range(6))
def test_the_device_tree_is_the_host_tree(seed):
    """The tree grown at fixed shapes on the device equals `grow_tree`'s (nodes, order, parents), ties included, and its
    verification layout is the one `TreeLayout.of_draft` builds from the parents."""
    cases = [(40, 3, 2, 5, False), (40, 4, 3, 10, False), (40, 3, 4, 8, True), (40, 2, 1, 2, False),
             (3, 3, 4, 100, False), (40, 3, 3, 100, True)]                          # N < width; nodes > candidates
    for N, depth, width, nodes, ties in cases:
        host, device = _random_tree(seed, N, depth, width, nodes, ties)
        assert torch.equal(device.tokens, host.tokens) and device.parents.tolist() == host.parents, (N, depth, width, nodes, ties)
        layout = TreeLayout.of_draft(host.parents)
        assert torch.equal(device.layout.depths, layout.depths) and torch.equal(device.layout.ancestors, layout.ancestors)
        assert device.layout.parents.tolist() == layout.parents


def test_a_node_whose_log_probabilities_are_nan_grows_no_children():
    "A head that overflowed gives NaN log-probabilities: in both growths, that node's children lose to every real one."
    g = torch.Generator().manual_seed(0)
    N, full_ids = 30, torch.arange(100, 130)
    table = torch.log_softmax(torch.randn(N, N, generator=g) * 3, -1)              # [token, N]
    first = table[0]
    poisoned = int(first.topk(2).indices[0])                                       # the likeliest first draft overflows
    def logp(tokens):
        rows = table[torch.as_tensor(tokens) - 100].clone()                          # [f, N]
        rows[torch.as_tensor(tokens) - 100 == poisoned] = float("nan")
        return rows
    host = grow_tree(first, lambda d, tokens, rows, lineage: logp(tokens), 3, 2, 6, full_ids)
    device = grow_tree_on_device(first, lambda d, tokens, rows: logp(tokens), 3, 2, 6, full_ids)
    for tree in (host, device):
        parents, tokens = list(tree.parents if isinstance(tree.parents, list) else tree.parents.tolist()), tree.tokens[0].tolist()
        at = tokens.index(poisoned + 100)
        assert parents[at] == -1 and at not in parents and len(tokens) == 6       # kept as a node, with no children
    assert torch.equal(host.tokens, device.tokens)


def test_greedy_on_the_device_keeps_the_hosts_branch():
    "`Greedy.verify_tree_on_device` accepts the branch `greedy_branch` finds (a path padded past it), with the same next token."
    g, deep = torch.Generator().manual_seed(3), 0
    for seed in range(40):
        _, draft = _random_tree(seed, 12, 3, 3, 9)
        parents, drafted = draft.parents.tolist(), draft.tokens[0].tolist()
        logits = torch.randn(1, draft.k + 1, 500, generator=g)                      # [1, k+1, V]
        for node in range(draft.k + 1):                                             # most nodes' argmax is one of their children
            children = [drafted[i] for i, p in enumerate(parents) if p == node - 1]
            if children and torch.rand((), generator=g) < 0.8:
                logits[0, node, children[int(torch.randint(len(children), (), generator=g))]] = 50.0
        target_next = logits[0].argmax(-1).tolist()
        branch = greedy_branch(parents, drafted, target_next)
        n, path, next_token = Greedy().verify_tree_on_device(draft.tokens, draft.layout, logits)
        assert n.tolist() == [len(branch)] and path[:len(branch)].tolist() == [i + 1 for i in branch], seed
        assert next_token.tolist() == [target_next[branch[-1] + 1 if branch else 0]]
        deep += len(branch) >= 2
    assert deep >= 10                                                               # branches of two and more were checked


def _chain(net, prompt, branch, keep=()):
    "`prompt`'s last token followed by `branch` decoded as a plain chain: its `Forward` (logits `[1, len(branch)+1, V]`)."
    cache = net.new_cache(1, 64)
    net(prompt[:, :-1], cache, logits="none")
    return net(torch.cat([prompt[:, -1:], torch.tensor([branch])], 1), cache, keep=keep)

def _chain_logits(net, prompt, branch): return _chain(net, prompt, branch).logits[0]   # [len(branch)+1, V]


def test_a_tree_forward_gives_each_branch_the_logits_of_its_chain_and_keeps_one(tiny):
    net, prompt = tiny.net, tiny.encode(TEXTS[0])
    parents, drafts = [-1, -1, 0, 1, 1, 3], [11, 12, 13, 14, 15, 16]   # branches 11-13, 12-14-16, 12-15
    cache = net.new_cache(1, 64)
    net(prompt[:, :-1], cache, logits="none")
    start = cache.length
    keep = (0, net.num_layers - 1)
    logits, features = net(torch.cat([prompt[:, -1:], torch.tensor([drafts])], 1), cache, tree=TreeLayout.of_draft(parents),
                           keep=keep)                                                     # [1, 7, V], [1, 7, 2H]
    net.keep_path(cache, start, [2, 4, 6])                                                # keep 12-14-16 where a chain puts it
    chain = _chain(net, prompt, [12, 14, 16], keep).features                              # [1, 4, 2H]
    torch.testing.assert_close(features[:, [0, 2, 4, 6]], chain, atol=1e-4, rtol=1e-4)    # each node: its chain's features
    cache.rollback(start + 4)
    after = net(torch.tensor([[17]]), cache).logits[0, -1]                                # decoding goes on from the kept branch
    logits = logits[0]                                                                    # [7, V]
    torch.testing.assert_close(after, _chain_logits(net, prompt, [12, 14, 16, 17])[-1], atol=1e-4, rtol=1e-4)
    for branch in ([0, 2], [1, 3, 5], [1, 4]):
        chain = _chain_logits(net, prompt, [drafts[i] for i in branch])                   # [len+1, V]
        torch.testing.assert_close(logits[[0] + [i + 1 for i in branch]], chain, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("window", [None, 2, 3])
def test_the_fixed_shape_tree_mask_is_the_eager_one(window):
    "At fixed shapes (device tensors, the whole cache) a node sees the slots before the tree and its ancestors, by position."
    layout, start, capacity = TreeLayout([-1, 0, 0, 0, 3, 4, 1]), 5, 16        # 7 nodes at slots 5..11; node 3 at depth 1
    q, end = len(layout), start + len(layout)
    positions = start + layout.depths                                          # [q] the eager forward's positions
    eager = attention_mask(positions, torch.cat([torch.arange(start), positions]), window)   # [q, end]
    eager[:, start:] &= layout.ancestors
    fixed = tree_attention_mask(torch.arange(start, end), layout.depths, layout.ancestors, torch.arange(capacity), window)
    assert fixed.shape == (q, capacity)
    assert torch.equal(fixed[:, :end], eager)
    assert not fixed[:, end:].any()                                            # slots past the tree: stale, hidden
    if window == 2:                                                            # node 5 (depth 3) sees its parent only
        assert fixed[5].nonzero().flatten().tolist() == [start + 4, start + 5]     # not node 3 (slot 8, but position 6)


@torch.inference_mode()
def _tree_and_next(runner, prompt, drafts, parents, path, next_token):
    "A tree's logits `[q, V]` through `runner` (a net or its engine), then the logits after keeping `path` and one more token."
    cache = runner.new_cache(1, 64)
    runner(prompt[:, :-1], cache, logits="none")
    start = cache.length
    block = torch.cat([prompt[:, -1:], torch.tensor([drafts])], 1)                          # [1, q]
    logits, features = runner(block, cache, tree=TreeLayout.of_draft(parents), keep=(1,))  # [1, q, V], [1, q, H]
    logits = logits[0].clone()
    runner.keep_path(cache, start, path)
    cache.rollback(start + 1 + len(path))
    after = runner(torch.tensor([[next_token]]), cache).logits[0, -1].clone()
    return logits, features, after


def test_a_fixed_shape_tree_verification_equals_the_eager_one(tiny):
    "The engine's tree step gives every node the eager tree forward's logits, and decoding goes on alike from the kept branch."
    net, prompt = tiny.net, tiny.encode(TEXTS[0])
    parents, drafts, path = [-1, -1, 0, 1, 1, 3], [11, 12, 13, 14, 15, 16], [2, 4, 6]
    eager = _tree_and_next(net, prompt, drafts, parents, path, 17)
    engine = Engine(net, "fixed")
    fixed = _tree_and_next(engine, prompt, drafts, parents, path, 17)
    for a, b in zip(eager, fixed): torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert "q=7/tree" in engine.setup_seconds
    cache = engine.new_cache(1, 64)
    with pytest.raises(ValueError, match="a token tree of 3 nodes cannot verify 2 tokens"):
        engine(torch.tensor([[1, 2]]), cache, tree=TreeLayout([-1, 0, 0]))
    with pytest.raises(ValueError, match="a token tree's verification returns every node's logits"):
        engine(torch.tensor([[1, 2]]), cache, logits="last", tree=TreeLayout([-1, 0]))


@pytest.fixture(scope="module")
def trained(tiny):
    "An EAGLE head and 3 Medusa heads trained a few steps on the tiny target's own answers, over a reduced draft vocabulary."
    records = own_records(tiny, [tiny.encode(t) for t in TEXTS[:6]])
    vocab = DraftVocab.most_frequent([r["ids"] for r in records], 200, tiny.vocab_size, always=tiny.eos_token_ids)
    heads = {kind: new_head(kind, tiny, vocab, n=3, seed=0) for kind in ("eagle", "medusa")}
    for head in heads.values(): train_head(head, records, epochs=8, lr=1e-2, batch_size=3, seed=0, progress=False)
    return heads


@pytest.fixture(scope="module")
def eagle(trained): return trained["eagle"]


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_greedy_with_a_tree_equals_the_targets_greedy(tiny, trained, kind):
    head, steps = trained[kind], {}
    for width, nodes, K in ((2, 5, 3), (3, 10, 3), (4, 8, 2)):
        tree = TokenTree(head, width, nodes)
        for text in TEXTS[:8]:
            prompt = tiny.encode(text)
            out = generate(tiny, prompt, drafter=tree, controller=FixedK(K), max_new_tokens=40)
            assert torch.equal(out.tokens, hf_greedy(tiny, prompt, 40)), (width, nodes, text)
            assert head.missing_features == 0                      # the head read the kept branch's features every step
            assert max(out.accepted_lengths) <= K                  # K is the tree's depth
            assert len(out.stats.proposed_by_position) <= K        # acceptance is counted per depth, not per node
            steps[width] = steps.get(width, 0) + len(out.accepted_lengths)
    assert steps[3] < steps[2]                                    # a wider tree needs fewer target forwards


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_a_tree_of_width_one_drafts_the_heads_chain(tiny, trained, kind):
    "Width 1 keeps one node per depth: the tree is the chain the head drafts, so each step accepts the same drafts."
    head = trained[kind]
    for text in TEXTS[:6]:
        prompt = tiny.encode(text)
        chain = generate(tiny, prompt, drafter=head, controller=FixedK(3), max_new_tokens=40)
        tree = generate(tiny, prompt, drafter=TokenTree(head, 1, 3), controller=FixedK(3), max_new_tokens=40)
        assert tree.accepted_lengths == chain.accepted_lengths, text
        assert torch.equal(tree.tokens, chain.tokens)


def test_a_medusa_tree_scores_each_depth_with_its_own_head(tiny, trained):
    "Every expanded node's children are Medusa head d's `width` likeliest tokens, whatever the parent."
    medusa, prompt, width = trained["medusa"], tiny.encode(TEXTS[4]), 2
    prefill = tiny.net(prompt[:, :-1], tiny.net.new_cache(1, prompt.shape[1] + 8), logits="none", keep=medusa.target_layers)
    medusa.start(tiny, prompt, prompt.shape[1] + 8, prefill.features)
    features = medusa.pending[-1][:, -1:]                                            # [1, 1, H]
    draft = medusa.propose_tree(prompt, 3, width, 100)
    per_head = [sorted(medusa.draft_vocab.ids[medusa(features)[d, 0, -1].topk(width).indices].tolist()) for d in range(3)]
    tokens, parents, depth = draft.tokens[0].tolist(), draft.parents.tolist(), {}
    for i, p in enumerate(parents):
        depth[i] = 1 if p == -1 else depth[p] + 1
    for node in [-1] + [i for i in range(len(tokens)) if i in parents]:
        children = sorted(tokens[i] for i, p in enumerate(parents) if p == node)
        assert children == per_head[0 if node == -1 else depth[node]], node
    assert max(depth.values()) == 3 and len(tokens) == width + width * width + width * width


def _head_after_prefill(tiny, head, prompt):
    "The head started on `prompt` as generate() starts it: the target's prefill features of all tokens but the last."
    prefill = tiny.net(prompt[:, :-1], tiny.net.new_cache(1, prompt.shape[1] + 64), logits="none", keep=head.target_layers)
    head.start(tiny, prompt, prompt.shape[1] + 64, prefill.features)


def test_each_tree_node_drafts_what_the_head_drafts_after_its_branch(smol):
    """A node's children are the head's `width` likeliest tokens after the node's own branch, as a chain along it would draft
    (the shipped head in float32 on SmolLM2: its attention, unlike a tiny random head's, tells siblings apart)."""
    from specdec.heads import shipped_head
    from specdec.prompts import builtin_prompts
    tiny, eagle, width = smol, shipped_head(smol, "eagle", dtype="float32"), 3
    prompt = builtin_prompts()[0].encode(smol)
    _head_after_prefill(tiny, eagle, prompt)
    draft = eagle.propose_tree(prompt, 3, width, 100)                             # every expanded node kept
    tokens, parents, L = draft.tokens[0].tolist(), draft.parents.tolist(), prompt.shape[1]
    children = {}
    for i, p in enumerate(parents): children.setdefault(p, []).append(tokens[i])
    expanded = [i for i in range(len(tokens)) if i in children]
    assert len(children[-1]) == width and len(expanded) == width + width          # depth 1: all; depth 2: the best `width`
    assert any(parents[i] != parents[expanded[0]] or i != expanded[0] for i in expanded[1:])
    for node in [-1] + expanded:
        branch, a = [], node
        while a != -1: branch.insert(0, tokens[a]); a = parents[a]
        _head_after_prefill(tiny, eagle, prompt)
        out = eagle._catch_up(prompt)                                              # [1, 1, H] at L-2
        for i, t in enumerate(branch): out = eagle(torch.tensor([[t]]), out, L - 1 + i, eagle.cache)
        top = eagle.logits(out[0, -1]).topk(width).indices                        # [w] draft ids
        assert sorted(eagle.draft_vocab.ids[top].tolist()) == sorted(children[node]), (node, branch)


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_trees_at_fixed_shapes_are_lossless_and_accept_as_eagerly(tiny, trained, kind):
    "compile='fixed' verifies each tree through the engine's tree step: HF's greedy tokens, the eager run's accepted lengths."
    tree = TokenTree(trained[kind], 2, 5)
    for text in TEXTS[:4]:
        prompt = tiny.encode(text)
        eager = generate(tiny, prompt, drafter=tree, controller=FixedK(3), max_new_tokens=30, compile="eager")
        fixed = generate(tiny, prompt, drafter=tree, controller=FixedK(3), max_new_tokens=30, compile="fixed")
        assert torch.equal(fixed.tokens, hf_greedy(tiny, prompt, 30)), text
        assert fixed.accepted_lengths == eager.accepted_lengths, text
        assert fixed.engine["mode"] == "fixed" and "target:q=6/tree" in fixed.engine["setup_seconds"]
        assert trained[kind].missing_features == 0
    assert generate(tiny, prompt, drafter=tree, max_new_tokens=4).engine["mode"] == "eager"      # auto on the CPU
    both = Fallback([PromptLookup(3, 2), TokenTree(trained[kind], 3, 8)])                          # trees and chains
    for text in TEXTS[:4]:
        prompt = tiny.encode(text)
        out = generate(tiny, prompt, drafter=both, controller=FixedK(3), max_new_tokens=30, compile="fixed")
        assert torch.equal(out.tokens, hf_greedy(tiny, prompt, 30)), text


def test_an_eagle2_sized_tree_is_verified_by_its_own_fixed_shape_step(tiny, eagle, monkeypatch):
    """EAGLE-2's tree (60 nodes, depth 6) verifies 61 tokens through the engine's step of that shape (what CUDA graphs
    capture and replay), not through an eager forward; HF's greedy tokens."""
    calls, build = [], Engine._step
    def counted(self, q, logits, cache):
        step = build(self, q, logits, cache)
        return lambda *args: (calls.append((q, logits)), step(*args))[1]
    monkeypatch.setattr(Engine, "_step", counted)
    prompt = tiny.encode(TEXTS[0])
    out = generate(tiny, prompt, drafter=TokenTree(eagle, 10, 60), controller=FixedK(6), max_new_tokens=20, compile="fixed")
    assert torch.equal(out.tokens, hf_greedy(tiny, prompt, 20))
    widths = [q for q, logits in calls if logits == "tree"]                 # the last step may draft less: few tokens left
    assert len(widths) == len(out.accepted_lengths) > 2 and widths[:-1] == [61] * (len(widths) - 1)


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_heads_and_trees_read_each_step_before_the_next_overwrites_it(tiny, trained, kind):
    """Under `GraphBuffers` (a CUDA graph's static buffers, emulated on the CPU) chains, trees (their depths run at one
    width) and prompt lookup falling back to a tree give HF's greedy tokens and the eager run's accepted lengths, and
    rejection sampling the tokens of the same seed without the emulation."""
    head = trained[kind]
    drafters = [(head, 4), (TokenTree(head, 2, 4), 3), (TokenTree(head, 4, 12), 4), (Fallback([PromptLookup(3, 2), TokenTree(head, 3, 8)]), 3)]
    for text in TEXTS[:2] + [" ".join(TEXTS[:4])]:                          # the last: a prompt of 2 prefill chunks
        prompt = tiny.encode(text)
        for drafter, k in drafters:
            eager = generate(tiny, prompt, drafter=drafter, controller=FixedK(k), max_new_tokens=24, compile="eager")
            with GraphBuffers():
                buffered = generate(tiny, prompt, drafter=drafter, controller=FixedK(k), max_new_tokens=24, compile="fixed")
            assert torch.equal(buffered.tokens, hf_greedy(tiny, prompt, 24)), (text, drafter.name)
            assert buffered.accepted_lengths == eager.accepted_lengths, (text, drafter.name)
        for drafter, k in drafters[:2]:
            sampled = dict(drafter=drafter, controller=FixedK(k), policy=RejectionSampling(), temperature=0.9, top_p=1.0,
                           max_new_tokens=24, seed=3)
            plain = generate(tiny, prompt, compile="fixed", **sampled)
            with GraphBuffers(): buffered = generate(tiny, prompt, compile="fixed", **sampled)
            assert torch.equal(buffered.tokens, plain.tokens) and buffered.accepted_lengths == plain.accepted_lengths, (text, drafter.name)


def test_a_head_overflowing_past_its_trained_depth_leaves_fixed_shapes_as_eager(tiny, trained):
    """A float16 head whose fed-back output grows at each depth overflows (inf, then NaN) a few depths down. Those nodes
    must lose in the tree (NaN log-probs), and no NaN may enter the head's cache, where a fixed-shape forward attends over
    every slot: the fixed run then accepts as the eager one does (before the fix, the fixed run accepted nothing after
    the first deep tree)."""
    head = new_head("eagle", tiny, trained["eagle"].draft_vocab, seed=0).to(torch.float16)
    with torch.no_grad(): head.fc.weight.mul_(30)               # what it reads (its own output, fed back) grows ×30 a depth
    tree = TokenTree(head, 2, 8)
    for text in TEXTS[:4]:
        prompt = tiny.encode(text)
        eager = generate(tiny, prompt, drafter=tree, controller=FixedK(6), max_new_tokens=30, compile="eager")
        fixed = generate(tiny, prompt, drafter=tree, controller=FixedK(6), max_new_tokens=30, compile="fixed")
        assert torch.equal(fixed.tokens, hf_greedy(tiny, prompt, 30)) and torch.equal(eager.tokens, fixed.tokens), text
        assert fixed.accepted_lengths == eager.accepted_lengths, text
    features = torch.randn(1, 1, len(head.target_layers) * head.fc.weight.shape[0], dtype=torch.float16)
    hidden, grew = head.fused(features), []
    for _ in range(6):                                              # the head's own output fed back, as depths do
        hidden = head(torch.tensor([[5]]), hidden, 0, None)
        grew.append(bool(torch.isfinite(hidden).all()))
    assert grew[0] and not grew[-1]                                 # it does overflow within the tree's depth


def test_a_compiled_tree_step_gives_the_eager_tokens(trained):
    "torch.compile (CPU) of the tree step: the eager greedy tokens; its compile time is reported per shape."
    small = tiny_llama(seed=7, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    records = own_records(small, [small.encode(t) for t in TEXTS[:3]])
    head = new_head("eagle", small, None, seed=0)
    train_head(head, records, epochs=2, lr=1e-2, batch_size=3, seed=0, progress=False)
    prompt = small.encode(TEXTS[1])
    ref = generate(small, prompt, max_new_tokens=12, eos_token_id=[], compile="eager").tokens
    out = generate(small, prompt, drafter=TokenTree(head, 2, 4), controller=FixedK(2), max_new_tokens=12,
                   eos_token_id=[], compile="compile")
    assert torch.equal(out.tokens, ref)
    assert out.engine["setup_seconds"]["target:q=5/tree"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trees_in_cuda_graphs_give_the_eager_tokens_on_cuda():
    "On CUDA (float32), each tree is verified by a graph replay (depths and mask copied in): the eager run's tokens."
    gpu = tiny_llama(seed=0, device="cuda", dtype=torch.float32)
    records = own_records(gpu, [gpu.encode(t) for t in TEXTS[:4]])
    for kind in ("eagle", "medusa"):
        head = new_head(kind, gpu, None, n=3, seed=0)
        train_head(head, records, epochs=4, lr=1e-2, batch_size=2, seed=0, progress=False)
        for drafter in (TokenTree(head, 2, 5), Fallback([PromptLookup(3, 2), TokenTree(head, 3, 8)])):
            for text in TEXTS[:3]:
                prompt = gpu.encode(text)
                eager = generate(gpu, prompt, drafter=drafter, controller=FixedK(3), max_new_tokens=30, compile="eager")
                graphs = generate(gpu, prompt, drafter=drafter, controller=FixedK(3), max_new_tokens=30)   # auto: graphs
                assert graphs.engine["mode"] == "graphs"
                assert torch.equal(graphs.tokens, eager.tokens), (kind, drafter.name, text)
                assert torch.equal(graphs.tokens, hf_greedy(gpu, prompt, 30)), (kind, drafter.name, text)


def test_prompt_lookup_falling_back_to_an_eagle_tree_is_lossless(tiny, eagle):
    drafter = Fallback([PromptLookup(3, 2), TokenTree(eagle, 3, 12)])
    for text in TEXTS[:8]:
        prompt = tiny.encode(text)
        out = generate(tiny, prompt, drafter=drafter, controller=FixedK(4), max_new_tokens=40)
        assert torch.equal(out.tokens, hf_greedy(tiny, prompt, 40)), text
    assert all(u["steps"] > 0 for u in drafter.usage), drafter.usage


def test_tree_errors_name_the_problem(tiny, eagle):
    prompt = tiny.encode(TEXTS[0])
    with pytest.raises(ValueError, match=re.escape("eagle-tree:4:10 drafts token trees, which policy Typical cannot verify: "
                                                   "use greedy or rejection")):
        generate(tiny, prompt, drafter=TokenTree(eagle), policy=Typical(), temperature=0.8, max_new_tokens=8)
    with pytest.raises(NotImplementedError, match="Typical cannot verify token trees"):
        Typical().verify_tree(torch.tensor([[1]]), [-1], torch.zeros(1, 2, 5), None)
    with pytest.raises(ValueError, match="token tree width must be a positive integer, got 0"): TokenTree(eagle, 0)
    with pytest.raises(ValueError, match="token tree nodes must be a positive integer, got 1.5"): TokenTree(eagle, 2, 1.5)
    with pytest.raises(ValueError, match="pld:3 does not draft token trees"): TokenTree(PromptLookup())


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_the_shipped_heads_draft_trees_losslessly_and_accept_more(smol, kind):
    "On SmolLM2-135M (float32): the trees' output equals HF greedy, with fewer target forwards than the chains."
    from specdec.prompts import builtin_prompts
    tree = make_drafter(f"{kind}-tree:4:10", smol)
    assert spec_of(tree) == tree.name == f"{kind}-tree:4:10" and spec_of(make_drafter(f"{kind}-tree", smol)) == tree.name
    chain = make_drafter(kind, smol)
    forwards = {"tree": 0, "chain": 0}
    for prompt in builtin_prompts()[:3]:
        ids = prompt.encode(smol)
        ref = hf_greedy(smol, ids, 32)
        for name, drafter, K in (("tree", tree, 3), ("chain", chain, 3)):
            out = generate(smol, ids, drafter=drafter, controller=FixedK(K), max_new_tokens=32)
            assert torch.equal(out.tokens, ref), (name, prompt.id)
            forwards[name] += out.stats.target_forwards
    assert forwards["tree"] < forwards["chain"], forwards


class KeepRejectedSiblings(RejectionSampling):
    "A wrong tree rule, for the test to reject: after a rejected child, the next one is tried against the unchanged p."
    def without(self, probs, token): return probs


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_rejection_sampling_over_a_tree_keeps_the_target_distribution(small_vocab_target, one_thread, kind):
    "The pair law of the first two tokens is the target's (chi-square, fixed seeds); the wrong rule fails the same test."
    target = small_vocab_target
    g = torch.Generator().manual_seed(0)
    records = [{"ids": torch.randint(0, V, (24,), generator=g).tolist(), "answer_start": 1} for _ in range(8)]
    head = new_head(kind, target, DraftVocab(list(range(0, V, 2)) + [1, 3], V), n=2, seed=0)    # 10 of the 16 ids
    train_head(head, records, epochs=1, lr=1e-3, batch_size=4, seed=0, progress=False)
    tree, sampling, prompt = TokenTree(head, 3, 6), SamplingConfig(0.7, top_p=0.9), torch.tensor([[1, 5, 7]])
    t1, t2, *_ = _tables(target, target, prompt)
    joint = logits_to_probs(t1, sampling)[:, None] * logits_to_probs(t2, sampling)              # [V, V] the target's law
    cells, two_deep = _head_pairs(target, tree, prompt, sampling, RejectionSampling(), 2000)   # trees of depth 2 (FixedK(2))
    assert two_deep >= 2000 and head.missing_features == 0
    assert _chi2_pvalue(cells, joint) > 1e-3
    if kind == "eagle":                                                   # the same test rejects a wrong rule (once: time)
        wrong, _ = _head_pairs(target, tree, prompt, sampling, KeepRejectedSiblings(), 4000)
        assert _chi2_pvalue(wrong, joint) < 1e-4


def _walk_law(parents, drafted, target_probs):
    "The exact law of what one host walk (`RejectionSampling.verify_tree`) emits: `{(accepted tokens..., next token): p}`."
    law = {}
    def visit(node, prefix, weight):
        probs, left = target_probs[node + 1].double(), 1.0                          # [V] the target after `node`
        for c in [i for i, p in enumerate(parents) if p == node]:
            residual = probs / probs.sum()
            accept = float(residual[drafted[c]])
            visit(c, prefix + (drafted[c],), weight * left * accept)
            left *= 1 - accept
            probs = probs.clone(); probs[drafted[c]] = 0
        for token, p in enumerate((probs / probs.sum()).tolist()):
            if p > 0: law[prefix + (token,)] = law.get(prefix + (token,), 0.0) + weight * left * p
    visit(-1, (), 1.0)
    return law


def test_rejection_sampling_on_the_device_follows_the_host_walks_law():
    """`RejectionSampling.verify_tree_on_device` emits what the host walk emits, in law: chi-square against the exact law of
    the walk over one fixed tree (tokens repeated across branches, never among siblings), 10,000 seeded verifications."""
    from scipy.stats import chisquare
    parents, drafted = [-1, -1, -1, 0, 0, 1, 3], [2, 4, 1, 3, 4, 2, 5]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, len(parents) + 1, 6, generator=g) * 1.5                # [1, q, V=6]
    host = TreeLayout.of_draft(parents)
    layout = TreeLayout.on_device(torch.tensor(host.parents), 3)
    sampling, policy = SamplingConfig(1.0), RejectionSampling()
    law = _walk_law(parents, drafted, logits_to_probs(logits, sampling)[0])
    assert abs(sum(law.values()) - 1) < 1e-9 and max(len(key) for key in law) == 4      # branches 3 deep are possible
    counts, runs, generator = {}, 10000, torch.Generator().manual_seed(1)
    for _ in range(runs):
        n, path, next_token = policy.verify_tree_on_device(torch.tensor([drafted]), layout, logits, sampling, generator)
        key = tuple(drafted[i - 1] for i in path[:int(n)].tolist()) + (int(next_token),)
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) <= set(law)                                                   # nothing the walk cannot emit
    keys = sorted(law, key=law.get, reverse=True)
    big = [k for k in keys if law[k] * runs >= 5]                                    # rare outcomes pooled into one cell
    observed = [counts.get(k, 0) for k in big] + [runs - sum(counts.get(k, 0) for k in big)]
    expected = [law[k] * runs for k in big] + [runs * (1 - sum(law[k] for k in big))]
    assert len(big) >= 15 and chisquare(observed, expected).pvalue > 1e-3


@pytest.mark.parametrize("compile", ["eager", "fixed"])
def test_a_tree_step_reads_the_device_once(tiny, trained, monkeypatch, compile):
    """A tree is grown and verified on the device (greedy): one read per step (`read_step`), no other op that would sync
    a GPU; prompt lookup on the device before a tree reads once more, whether it drafted, and stays lossless."""
    reads, real = [], decode.read_step
    monkeypatch.setattr(decode, "read_step", lambda summary: reads.append(1) or real(summary))
    prompt = tiny.encode(TEXTS[2])
    plain = generate(tiny, prompt, max_new_tokens=30, eos_token_id=[]).tokens      # past any EOS: every step drafts
    for kind in ("eagle", "medusa"):
        reads.clear()
        with CountSyncs() as syncs:
            out = generate(tiny, prompt, drafter=TokenTree(trained[kind], 2, 5), controller=FixedK(3), max_new_tokens=30,
                           eos_token_id=[], compile=compile)
        assert len(reads) == out.stats.target_forwards and syncs.seen == [], (kind, syncs.seen)
        assert torch.equal(out.tokens, plain) and max(out.accepted_lengths) > 0
        reads.clear()
        with CountSyncs() as syncs:                                                # rejection sampling walks it there too
            out = generate(tiny, prompt, drafter=TokenTree(trained[kind], 2, 5), controller=FixedK(3), max_new_tokens=30,
                           eos_token_id=[], compile=compile, temperature=0.8, top_p=0.9)
        assert len(reads) == out.stats.target_forwards and syncs.seen == [], (kind, syncs.seen)
    both = Fallback([PromptLookup(3, 2, on_device=True), TokenTree(trained["eagle"], 2, 5)])
    for text in TEXTS[:4]:
        prompt = tiny.encode(text)
        with CountSyncs() as syncs:
            out = generate(tiny, prompt, drafter=both, controller=FixedK(3), max_new_tokens=30, compile=compile)
        assert torch.equal(out.tokens, hf_greedy(tiny, prompt, 30)), text
        assert set(syncs.seen) <= {"_local_scalar_dense", "item"} and len(syncs.seen) <= 2 * out.stats.target_forwards
    assert both.usage[0]["steps"] > 0 and both.usage[1]["steps"] > 0            # both drafted, somewhere


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_tree_step_does_not_sync_on_cuda(monkeypatch):
    "Under torch.cuda.set_sync_debug_mode('error'), a tree step (CUDA graphs) syncs only in read_step and in graph captures."
    from specdec.heads import HeadSteps
    gpu = tiny_llama(seed=0, device="cuda", dtype=torch.float32)
    records = own_records(gpu, [gpu.encode(t) for t in TEXTS[:4]])

    def allowed(fn, then=None):                                                    # may sync: read_step and graph builds
        def run(*args, **kwargs):
            mode = torch.cuda.get_sync_debug_mode() if then is None else then
            torch.cuda.set_sync_debug_mode(0)
            try: return fn(*args, **kwargs)
            finally: torch.cuda.set_sync_debug_mode(mode)
        return run
    monkeypatch.setattr(decode, "read_step", allowed(decode.read_step, "error"))   # every op after the first read: no sync
    monkeypatch.setattr(HeadSteps, "_capture", allowed(HeadSteps._capture))
    monkeypatch.setattr(Engine, "_step", allowed(Engine._step))
    try:
        for kind in ("eagle", "medusa"):
            head = new_head(kind, gpu, None, n=3, seed=0)
            train_head(head, records, epochs=2, lr=1e-2, batch_size=2, seed=0, progress=False)
            out = generate(gpu, gpu.encode(TEXTS[0]), drafter=TokenTree(head, 2, 5), controller=FixedK(3), max_new_tokens=24,
                           eos_token_id=[])
            torch.cuda.set_sync_debug_mode(0)
            assert out.engine["mode"] == "graphs" and out.tokens.shape[1] == 24
    finally:
        torch.cuda.set_sync_debug_mode(0)
