"""Rows as slots (`decode.Batch`): between two steps a new prompt prefills into a free row and a row is released, the
other rows going on. A prompt admitted into a running batch decodes exactly its batch-1 output, with every drafter
kind, and its sampled output is its own seed's; what cannot be done is said."""
import pytest, torch
from specdec import generate
from specdec.decode import Batch
from specdec.drafters import Drafter, PromptLookup, DraftModel, LayerSkip, Fallback
from specdec.controllers import FixedK
from specdec.suffix import SuffixDecoding
from specdec.train import new_head
from specdec.net import DecoderNet
from specdec.specs import make_drafter
from test_batch import _prompts
from test_batch_trees import HEADS


def _drafters(tiny):
    return {"ar": lambda: None, "pld": PromptLookup, "pld-device": lambda: PromptLookup(on_device=True),
            "model": lambda: DraftModel("tiny-llama-draft"), "layerskip": lambda: LayerSkip(tiny, 2),
            "eagle": lambda: new_head("eagle", tiny, seed=0), "medusa": lambda: new_head("medusa", tiny, seed=0),
            "suffix": SuffixDecoding, "pld+layerskip": lambda: Fallback([PromptLookup(3, 2), LayerSkip(tiny, 2)])}


def _run_slots(tiny, drafter, prompts, budgets, rows=2, compile="eager", temperature=0.0, seeds=None):
    """Start `rows` prompts, then whenever a row finishes release it and admit the next prompt: every prompt's output
    and the rows each took."""
    seeds = seeds or list(range(len(prompts)))
    batch = Batch(tiny, rows, max(p.numel() for p in prompts) + max(budgets), drafter,
                  controller=FixedK(3) if drafter is not None else None, temperature=temperature, eos_token_id=[],
                  compile=compile)
    first = prompts[:rows]
    padded = torch.nn.utils.rnn.pad_sequence(first, batch_first=True)
    batch.start(padded, [p.numel() for p in first], budgets[:rows], seed=seeds[0])
    assert seeds[:rows] == [seeds[0] + b for b in range(rows)]                  # row b of `start`: seed + b
    row_of, outputs, waiting = {b: b for b in range(rows)}, {}, list(range(rows, len(prompts)))
    while row_of:
        batch.step()
        for b, i in list(row_of.items()):
            if not batch.done[b]: continue
            outputs[i], stats = batch.release(b)
            assert stats.new_tokens == outputs[i].numel() == budgets[i]
            del row_of[b]
            if waiting:
                j = waiting.pop(0)
                row_of[batch.admit(prompts[j], budgets[j], seed=seeds[j])] = j
    return [outputs[i] for i in range(len(prompts))]


def admitted_and_alone(tiny, drafter) -> tuple[list, list]:
    """Five prompts of different lengths and budgets through two rows (`_run_slots`): each one's output ids, and its
    batch-1 greedy output's."""
    prompts = _prompts(tiny, 5)
    budgets = [12, 12, 20, 7, 15]
    alone = [generate(tiny, p, max_new_tokens=n, eos_token_id=[]).tokens[0] for p, n in zip(prompts, budgets)]
    outputs = _run_slots(tiny, drafter, prompts, budgets)
    return [o.tolist() for o in outputs], [a.tolist() for a in alone]


@pytest.mark.parametrize("kind", ["ar", "pld", "pld-device", "model", "layerskip", "eagle", "medusa", "suffix",
                                  "pld+layerskip"])
def test_a_prompt_admitted_into_a_running_batch_decodes_its_batch_1_output(tiny, kind):
    """Two rows; five prompts of different lengths and budgets: each prompt after the first two takes the row that
    finished first, while the other row is mid-generation. Every output equals that prompt's batch-1 greedy output."""
    outputs, alone = admitted_and_alone(tiny, _drafters(tiny)[kind]())
    assert outputs == alone, kind


def test_slots_at_fixed_shapes_and_in_a_one_row_batch(tiny):
    "The fixed-shape engine's cache takes an admitted row's prefill; a one-row batch is reused request after request."
    prompts, budgets = _prompts(tiny, 4), [10, 10, 14, 6]
    alone = [generate(tiny, p, max_new_tokens=n, eos_token_id=[]).tokens[0] for p, n in zip(prompts, budgets)]
    fixed = _run_slots(tiny, LayerSkip(tiny, 2), prompts, budgets, compile="fixed")
    one_row = _run_slots(tiny, new_head("eagle", tiny, seed=0), prompts, [10] + budgets[1:], rows=1)
    assert [o.tolist() for o in fixed] == [a.tolist() for a in alone]
    assert [o.tolist() for o in one_row] == [a.tolist() for a in alone]


def test_an_admitted_row_samples_with_its_own_seed(tiny):
    """Sampled, an admitted prompt draws from its own generator: its output is the one it has as row 0 of a batch
    started at that seed (rows of a batch draw K a step to the end; one prompt alone clips K at its budget), whatever
    row it takes and whoever its neighbours are; at another seed it differs (the control)."""
    prompts, budgets = _prompts(tiny, 3), [8, 16, 12]
    kw = dict(drafter=DraftModel("tiny-llama-draft"), controller=FixedK(3), temperature=0.9, eos_token_id=[])
    started = generate(tiny, [prompts[2], prompts[0]], max_new_tokens=12, seed=11, **kw).tokens[0]
    other = generate(tiny, [prompts[2], prompts[0]], max_new_tokens=12, seed=12, **kw).tokens[0]
    outputs = _run_slots(tiny, DraftModel("tiny-llama-draft"), prompts, budgets, temperature=0.9, seeds=[3, 4, 11])
    assert outputs[2].tolist() == started.tolist() and started.tolist() != other.tolist()


def test_an_empty_batch_changes_its_sampling_for_the_next_requests(tiny):
    """A one-row batch serves a greedy request, then (empty) switches to sampling: the next request's output is its
    batch-1 sampled output at its seed; while a row holds a request the sampling stays."""
    prompts = _prompts(tiny, 2)
    kw = dict(controller=FixedK(3), eos_token_id=[])
    batch = Batch(tiny, 1, 200, DraftModel("tiny-llama-draft"), **kw)
    batch.start(prompts[0][None], [prompts[0].numel()], 10)
    with pytest.raises(RuntimeError, match=r"rows \[0\] hold requests"): batch.set_sampling(0.9)
    with pytest.raises(RuntimeError, match=r"rows \[0\] hold requests: the EOS ids"): batch.set_eos([])
    while not batch.done[0]: batch.step()
    greedy, _ = batch.release(0)
    batch.set_sampling(0.9)
    batch.admit(prompts[1], 12, seed=5)
    while not batch.done[0]: batch.step()
    sampled, _ = batch.release(0)
    expect = generate(tiny, prompts[1], DraftModel("tiny-llama-draft"), max_new_tokens=12, temperature=0.9, seed=5, **kw)
    assert greedy.tolist() == generate(tiny, prompts[0], max_new_tokens=10, eos_token_id=[]).tokens[0].tolist()
    assert sampled.tolist() == expect.tokens[0].tolist()
    assert sampled.tolist() != generate(tiny, prompts[1], max_new_tokens=12, eos_token_id=[]).tokens[0].tolist()


class _Stateful(PromptLookup):
    "A drafter that declares no `admit`: it cannot take a row in a running batch."
    admit = Drafter.admit


def test_slots_say_what_they_cannot_do(tiny):
    prompts = _prompts(tiny, 3)
    batch = Batch(tiny, 2, 200, PromptLookup())
    with pytest.raises(RuntimeError, match="admit before start"): batch.admit(prompts[0], 8)
    batch.start(prompts[0][None], [prompts[0].numel()], 8)
    assert batch.free_rows == [1]
    with pytest.raises(ValueError, match="empty prompt"): batch.admit([], 8)
    with pytest.raises(ValueError, match=r"\+ 500 new > the batch's max_length 200"): batch.admit(prompts[1], 500)
    assert batch.admit(prompts[1], 8) == 1
    with pytest.raises(RuntimeError, match="no free row: the 2 rows all hold a request"): batch.admit(prompts[2], 8)
    out, stats = batch.release(1)
    with pytest.raises(ValueError, match="row 1 holds no request"): batch.release(1)
    assert out.numel() == stats.new_tokens == 0                                  # released before its first step
    stateful = Batch(tiny, 2, 200, _Stateful())
    stateful.start(None, [], 8)
    with pytest.raises(NotImplementedError, match="cannot take a new prompt into a running batch"):
        stateful.admit(prompts[0], 8)


def _served(tiny, drafter, prompts, budgets, arrivals, rows=4, compile="eager"):
    """Requests arriving at given steps (`arrivals[i]`: prompt i's) into a batch of `rows`, each taking the lowest free
    row, released when done: every prompt's output, and per step the rows the target's forward decoded beside the rows
    that held a request then (1 + the last row not done)."""
    batch = Batch(tiny, rows, max(p.numel() for p in prompts) + max(budgets), drafter,
                  controller=FixedK(3) if drafter is not None else None, eos_token_id=[], compile=compile)
    batch.start(None, [], 1)
    widths, stepping, forward = [], [False], DecoderNet.__call__
    def counted(net, input_ids, cache, *a, **kw):
        if stepping[0] and net is tiny.net: widths[-1].append(input_ids.shape[0])
        return forward(net, input_ids, cache, *a, **kw)
    row_of, outputs, step = {}, {}, 0
    DecoderNet.__call__ = counted
    try:
        while len(outputs) < len(prompts):
            for i in [i for i, t in enumerate(arrivals) if t == step]:
                row_of[batch.admit(prompts[i], budgets[i], seed=i)] = i
            if row_of:
                live = max(b for b in row_of if not batch.done[b]) + 1
                widths.append([live]); stepping[0] = True
                batch.step()
                stepping[0] = False
            for b, i in list(row_of.items()):
                if batch.done[b]: outputs[i] = batch.release(b)[0]; del row_of[b]
            step += 1
    finally: DecoderNet.__call__ = forward
    return [outputs[i] for i in range(len(prompts))], widths


@pytest.mark.parametrize("kind", ["ar", "pld", "model", "eagle", "suffix", "pld+layerskip", "eagle-tree"])
def test_a_step_decodes_only_the_rows_up_to_the_last_in_use(tiny, kind):
    """Requests come and go in a batch of 4 rows: rows 0-2 taken, row 0 free while rows 1 and 2 run on, row 2 done
    while row 1 runs on, then one request alone (row 0) and another beside it. Each step's target forward decodes the rows up to the last one in use (a free row before it
    runs along; free rows after it are skipped, their state kept), and every output is its batch-1 greedy output."""
    prompts, budgets, arrivals = _prompts(tiny, 5), [5, 28, 20, 9, 6], [0, 0, 0, 40, 41]
    alone = [generate(tiny, p, max_new_tokens=n, eos_token_id=[]).tokens[0] for p, n in zip(prompts, budgets)]
    drafter = (make_drafter(f"eagle-tree:2:4:{HEADS}/eagle-tiny", tiny) if kind == "eagle-tree"
               else _drafters(tiny)[kind]())
    outputs, widths = _served(tiny, drafter, prompts, budgets, arrivals)
    assert [o.tolist() for o in outputs] == [a.tolist() for a in alone], kind
    assert all(decoded == [live] for live, *decoded in widths), widths
    assert {w[0] for w in widths} >= {1, 2, 3}                                   # the batch narrowed and widened


def test_fixed_shapes_step_the_whole_batch(tiny):
    "The fixed-shape engine runs the batch whole (its shapes are built for it): every step decodes all 4 rows."
    prompts, budgets = _prompts(tiny, 2), [8, 5]
    alone = [generate(tiny, p, max_new_tokens=n, eos_token_id=[]).tokens[0] for p, n in zip(prompts, budgets)]
    outputs, widths = _served(tiny, PromptLookup(), prompts, budgets, [0, 3], compile="fixed")
    assert [o.tolist() for o in outputs] == [a.tolist() for a in alone]
    assert not any(decoded for _, *decoded in widths)                           # the engine's own forwards, not the net's


def test_a_prompt_vocabulary_head_takes_requests_in_a_one_row_batch(tiny):
    """A head drafting its prompt's tokens too (`prompt_vocab`) serves request after request in a one-row batch (as a
    one-row server does): each request's prompt joins its vocabulary, each output is the target's; in two rows, each row
    drafts from the draft vocabulary and its own request's prompt, never its neighbour's."""
    from specdec.vocab import DraftVocab
    prompts, budgets = _prompts(tiny, 3), [10, 12, 8]
    alone = [generate(tiny, p, max_new_tokens=n, eos_token_id=[]).tokens[0] for p, n in zip(prompts, budgets)]
    head = new_head("eagle", tiny, DraftVocab(torch.arange(16), tiny.vocab_size), seed=0)
    head.prompt_vocab = True
    batch = Batch(tiny, 1, 200, head, controller=FixedK(3), eos_token_id=[])
    batch.start(None, [], 1)
    for p, n, expect in zip(prompts, budgets, alone):
        batch.admit(p, n)
        assert set(p.tolist()) <= set(head.run_vocab.ids.tolist()) and len(head.run_vocab) > 16
        while not batch.done[0]: batch.step()
        assert batch.release(0)[0].tolist() == expect.tolist()
    admitted, drafts = _run_with_drafts(tiny, head, prompts, budgets)            # two rows, taking requests in turn
    assert [o.tolist() for o in admitted] == [a.tolist() for a in alone]
    held = [set(head.draft_vocab.ids.tolist()) | set(p.tolist()) for p in prompts]   # each request's own vocabulary
    assert all(set(row) <= held[i] for i, row in drafts), "a row drafted a token of another request's prompt"
    assert any(set(row) - set(range(16)) for _, row in drafts)                    # it drafts its prompt's tokens


def _run_with_drafts(tiny, head, prompts, budgets):
    """`_run_slots` over two rows, recording each row's drafts a step: the outputs, and (request, draft ids) pairs."""
    drafts, original, rows = [], head.propose, {}
    def propose(tokens, k, *args, **kwargs):
        draft = original(tokens, k, *args, **kwargs)
        for b, row in enumerate(draft.tokens.tolist()):
            if b in rows: drafts.append((rows[b], row[:k]))
        return draft
    admit = Batch.admit
    def admit_and_note(batch, prompt, *args, **kwargs):
        b = admit(batch, prompt, *args, **kwargs)
        rows[b] = next(i for i, p in enumerate(prompts) if p is prompt)
        return b
    head.propose, Batch.admit = propose, admit_and_note
    rows.update({0: 0, 1: 1})
    try: return _run_slots(tiny, head, prompts, budgets), drafts
    finally: del head.propose; Batch.admit = admit
