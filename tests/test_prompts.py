"Prompt sets: the built-in set, Spec-Bench files (and their errors), filters, hashes and encoding."
import json
from pathlib import Path
from types import SimpleNamespace
import pytest, torch
from specdec.prompts import Prompt, BUILTIN_PROMPTS, builtin_prompts, read_spec_bench, load_prompts, prompt_set_hash, summarize

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "fixtures" / "spec_bench_sample.jsonl"   # a few lines in Spec-Bench's format, committed
SEVEN = ["multi_turn", "translation", "summarization", "qa", "math_reasoning", "rag", "code"]


def line(qid=1, category="qa", turns=("Why is the sea salty?",), **extra):
    return json.dumps({"question_id": qid, "category": category, "turns": list(turns), **extra})


def write(tmp_path, *lines, name="prompts.jsonl"):
    path = tmp_path / name
    path.write_text("".join(l + "\n" for l in lines), encoding="utf-8")
    return path


# --- the built-in set ---

def test_builtin_categories_and_counts():
    counts = summarize(load_prompts())
    assert len(counts) >= 7
    for c in SEVEN: assert counts.get(c, 0) >= 4, c
    assert list(counts) == list(BUILTIN_PROMPTS)                       # grouped in the order written


def test_builtin_ids_unique_and_grounded_passages():
    prompts = builtin_prompts()
    assert len({p.id for p in prompts}) == len(prompts)
    for p in prompts:
        if p.category in ("summarization", "rag"):
            assert 80 <= len(p.turns[0].split("\n\n")[1].split()) <= 150, p.id
        if p.category == "multi_turn":
            assert len(p.turns) == 2 and len(p.replies) == 1, p.id


def test_messages_multi_turn_and_spec_bench_style():
    mt = load_prompts(categories="multi_turn", n_prompts=1)[0]
    msgs = mt.messages()
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert [msgs[0]["content"], msgs[1]["content"], msgs[2]["content"]] == [mt.turns[0], mt.replies[0], mt.turns[1]]
    sb = Prompt("82", "writing", ["Write a poem.", "Critique your poem."], [], "x.jsonl")   # no replies: first turn only
    assert sb.messages() == [{"role": "user", "content": "Write a poem."}]
    assert sb.plain_text() == "User: Write a poem.\nAssistant:"
    with pytest.raises(ValueError, match="3 turns need 2 replies"): Prompt("p", "qa", ["a", "b", "c"], ["x"])
    with pytest.raises(ValueError, match="non-empty list of strings"): Prompt("p", "qa", [])


# --- filters and hashes ---

def test_category_filter_and_n_prompts():
    sel = load_prompts(categories=["code", "qa"], n_prompts=2)
    assert [p.id for p in sel] == ["qa-1", "qa-2", "code-1", "code-2"]      # source order, first n of each
    assert [p.id for p in load_prompts(categories="qa, code", n_prompts=2)] == [p.id for p in sel]
    assert summarize(load_prompts(n_prompts=1)) == {c: 1 for c in BUILTIN_PROMPTS}
    assert len(load_prompts(categories="rag", n_prompts=100)) == len(BUILTIN_PROMPTS["rag"])
    assert load_prompts(categories="") == load_prompts(categories=None) == load_prompts(categories=[])


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_bad_n_prompts(n):
    with pytest.raises(ValueError, match="n_prompts must be a positive integer"): load_prompts(n_prompts=n)


def test_unknown_category_lists_available():
    with pytest.raises(ValueError, match=r"unknown categories 'poetry'.*available are multi_turn, translation"):
        load_prompts(categories="qa,poetry")


def test_hash_stable_and_sensitive():
    h = prompt_set_hash(load_prompts())
    assert h == prompt_set_hash(load_prompts()) and len(h) == 64
    changed = load_prompts()
    changed[3].turns[-1] += " Please be brief."
    assert prompt_set_hash(changed) != h
    replied = load_prompts()
    replied[0].replies[0] = "Something else."
    assert prompt_set_hash(replied) != h
    assert prompt_set_hash(load_prompts(n_prompts=2)) != h


# --- Spec-Bench files ---

def test_read_spec_bench(tmp_path):
    path = write(tmp_path, line(7, "qa", reference=["x"]), "", "  ", line("a-2", "writing", ["Write.", "Revise."]))
    prompts = read_spec_bench(path)
    assert [(p.id, p.category, p.turns, p.replies, p.source) for p in prompts] == [
        ("7", "qa", ["Why is the sea salty?"], [], "prompts.jsonl"),
        ("a-2", "writing", ["Write.", "Revise."], [], "prompts.jsonl")]
    assert [p.id for p in load_prompts(str(path), categories="writing")] == ["a-2"]


@pytest.mark.parametrize("lines, message", [
    ([line(1), "{not json", line(3)], r"prompts.jsonl line 2: not valid JSON \("),
    ([line(1), "", json.dumps({"question_id": 3, "category": "qa"})], "prompts.jsonl line 3: missing key 'turns'"),
    ([json.dumps({"category": "qa", "turns": ["x"]})], "line 1: missing key 'question_id'"),
    ([line(1), line(2, turns=[])], "line 2: 'turns' must be a non-empty list of strings"),
    ([line(1, turns=["ok", 3])], "line 1: 'turns' must be a non-empty list of strings"),
    ([json.dumps({"question_id": 1, "category": "qa", "turns": "Why?"})], "line 1: 'turns' must be a non-empty list of strings"),
    ([line(1, category=5)], "line 1: 'category' must be a string"),
    ([line(1, category="")], "line 1: 'category' must be a string"),
    ([line(None)], "line 1: 'question_id' must be an integer or a non-empty string"),
    (["[1, 2]"], "line 1: expected a JSON object, got list"),
    ([line(1), line(1)], r"line 2: duplicate question_id '1' \(first on line 1\)"),
    ([line(1, turns=["   "])], "line 1: the first turn is blank"),
])
def test_malformed_lines_name_file_and_line(tmp_path, lines, message):
    path = write(tmp_path, *lines)
    with pytest.raises(ValueError, match=message): read_spec_bench(path)
    with pytest.raises(ValueError, match=message): load_prompts(str(path))


def test_empty_and_missing_files(tmp_path):
    for text in ["", "\n  \n"]:
        (tmp_path / "empty.jsonl").write_text(text)
        with pytest.raises(ValueError, match="empty.jsonl: no prompts"): read_spec_bench(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"): load_prompts(str(tmp_path / "nope.jsonl"))


def test_bad_utf8(tmp_path):
    (tmp_path / "latin.jsonl").write_bytes(line(1).encode() + b"\n" + b'{"question_id": 2, "category": "qa", "turns": ["caf\xe9"]}\n')
    with pytest.raises(ValueError, match="latin.jsonl line 2: not valid UTF-8"): read_spec_bench(tmp_path / "latin.jsonl")


def test_spec_bench_sample_file():
    prompts = load_prompts(str(SAMPLE))
    assert [p.id for p in prompts] == ["81", "82", "111", "sum-1", "sum-2", "rag-1", "rag-2", "qa-1"]
    assert summarize(prompts) == {"writing": 2, "math": 1, "summarization": 2, "rag": 2, "qa": 1}
    assert all(p.source == "spec_bench_sample.jsonl" and not p.replies for p in prompts)
    assert [len(p.turns) for p in prompts[:3]] == [2, 2, 2] and all(len(p.messages()) == 1 for p in prompts)
    assert prompts[0].plain_text() == f"User: {prompts[0].turns[0]}\nAssistant:"      # first turn only
    assert summarize(load_prompts(str(SAMPLE), categories="rag,writing", n_prompts=1)) == {"writing": 1, "rag": 1}
    assert prompt_set_hash(prompts) == prompt_set_hash(read_spec_bench(SAMPLE))


# --- encoding ---

def test_encode_tiny_model_plain(tiny):
    p = load_prompts(categories="multi_turn", n_prompts=1)[0]
    for chat in (True, False):                      # the byte tokenizer has no chat template: plain transcript
        ids = p.encode(tiny, chat=chat)
        assert ids.dtype == torch.long and ids.shape == (1, 1 + len(p.plain_text().encode())) and ids.device == tiny.device
        assert ids[0, 0].item() == tiny.tokenizer.bos_token_id
        assert tiny.decode(ids) == p.plain_text()
    assert p.plain_text() == f"User: {p.turns[0]}\nAssistant: {p.replies[0]}\nUser: {p.turns[1]}\nAssistant:"


class TemplateTokenizer:
    "A stand-in tokenizer with a chat template that records what it was given."
    chat_template = "{{ messages }}"
    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        self.seen = messages
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
    def encode(self, text, add_special_tokens=True):
        self.special = add_special_tokens
        return [ord(c) % 1000 for c in text]


def test_encode_chat_template():
    tok = TemplateTokenizer()
    model = SimpleNamespace(tokenizer=tok, device=torch.device("cpu"), name="fake")
    p = Prompt("m", "multi_turn", ["Hi?", "And then?"], ["Hello."])
    ids = p.encode(model)
    assert tok.seen == p.messages() and tok.special is False
    assert ids.tolist() == [[ord(c) % 1000 for c in "<user>Hi?<assistant>Hello.<user>And then?<assistant>"]]
    ids = p.encode(model, chat=False)                # no template wanted: the plain transcript, with special tokens
    assert tok.special is True and ids.shape[1] == len(p.plain_text())


def test_encode_needs_a_tokenizer():
    model = SimpleNamespace(tokenizer=None, device=torch.device("cpu"), name="ids-only")
    with pytest.raises(ValueError, match="'ids-only' has no tokenizer"): load_prompts(n_prompts=1)[0].encode(model)


# --- the repeated-request workload ---

def test_repeated_workload_is_a_fixed_interleaved_sequence():
    from specdec.prompts import repeated_prompts, REPEATED_WORKLOAD, WORKLOADS
    stream = load_prompts("repeated")
    assert [p.id for p in stream] == [f"repeated-{i:02d}" for i in range(1, 19)] and "repeated" in WORKLOADS
    families = list(REPEATED_WORKLOAD)
    assert [p.category for p in stream] == families * 6                       # request i of each family in turn
    assert prompt_set_hash(stream) == prompt_set_hash(repeated_prompts())       # the same every time
    for family in families:                                                     # one instruction, varying inputs
        mine = [p for p in stream if p.category == family]
        assert len({p.turns[-1].split("\n\n")[0] for p in mine}) == 1 and len({tuple(p.turns) for p in mine}) == 6
        assert all(p.source == "repeated" for p in mine)
    revisits = [p for p in stream if p.category == "revise_reply"]
    assert all(len(p.turns) == 2 and len(p.replies) == 1 for p in revisits)    # it revisits its earlier answer
    picked = load_prompts("repeated", categories="add_type_hints,extract_order", n_prompts=2)
    assert [p.id for p in picked] == ["repeated-01", "repeated-02", "repeated-04", "repeated-05"]   # its order kept
    with pytest.raises(ValueError, match="unknown categories 'qa' in prompt set 'repeated'"):
        load_prompts("repeated", categories="qa")


def test_the_repeated_workloads_tuning_set_has_its_form_and_none_of_its_requests():
    "`repeated_dev`: the same kinds of task in the same order, other instructions and inputs (nothing shared)."
    from specdec.prompts import REPEATED_DEV_WORKLOAD, WORKLOADS
    dev, measured = load_prompts("repeated_dev"), load_prompts("repeated")
    assert [p.id for p in dev] == [f"repeated_dev-{i:02d}" for i in range(1, 19)] and "repeated_dev" in WORKLOADS
    assert [p.category for p in dev] == list(REPEATED_DEV_WORKLOAD) * 6 and all(p.source == "repeated_dev" for p in dev)
    for family in REPEATED_DEV_WORKLOAD:                                        # one instruction, varying inputs
        mine = [p for p in dev if p.category == family]
        assert len({p.turns[-1].split("\n\n")[0] for p in mine}) == 1 and len({tuple(p.turns) for p in mine}) == 6
    assert [(len(p.turns), len(p.replies)) for p in dev] == [(len(p.turns), len(p.replies)) for p in measured]
    assert not {t for p in dev for t in p.turns} & {t for p in measured for t in p.turns}
    assert not {p.category for p in dev} & {p.category for p in measured}


@pytest.mark.parametrize("workload", ["repeated", "repeated_dev"])
def test_the_repeated_workload_is_kept_out_of_training_data(workload):
    from specdec.distill import evaluation_texts
    texts = evaluation_texts()
    assert all(" ".join(t.lower().split()) in texts for p in load_prompts(workload) for t in p.turns)
