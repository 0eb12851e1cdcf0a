"""Self-distillation data (resumable, hashed, never the evaluation prompts), seeded repeatable training, and head
checkpoints: a round trip through the registry and clear errors for a corrupt file, another target, a mismatched
draft vocabulary."""
import json, pytest, torch
from specdec import generate
from specdec.models import tiny_llama
from specdec.vocab import DraftVocab
from specdec.heads import EagleHead, MedusaHeads
from specdec.checkpoints import save_head, load_head
from specdec.distill import (write_distill_data, read_data, read_features, record_features, feature_layers, data_hash,
                             magpie_prefix, evaluation_texts, _write_batch, PROMPT_STYLES, read_training_data,
                             write_copy_data, copy_records, COPY_TASKS)
from specdec.train import new_head, train_head
from specdec.specs import make_drafter, spec_of
from specdec.controllers import FixedK


def records_of(target, n=6, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"ids": torch.randint(0, 256, (length,), generator=g).tolist(), "answer_start": 8} for _ in range(n)]


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_training_is_repeatable_with_a_seed(tiny, kind):
    records = records_of(tiny)
    curve = lambda seed: train_head(new_head(kind, tiny, seed=seed), records, epochs=2, lr=1e-3, batch_size=2,
                                    seed=seed, progress=False)["losses"]
    first, again, other = curve(0), curve(0), curve(1)
    assert len(first) == 6
    torch.testing.assert_close(torch.tensor(again), torch.tensor(first), rtol=1e-5, atol=1e-6)
    assert (torch.tensor(other) - torch.tensor(first)).abs().max() > 1e-4   # the seed matters (init and order)


def test_training_data_that_cannot_train_the_head_is_refused(tiny):
    records = records_of(tiny, n=2)
    head = new_head("eagle", tiny, seed=0)                                   # fuses layers 2, 2 and 1 of tiny-llama
    recorded = record_features(tiny, records, layers=(3,))
    with pytest.raises(ValueError, match=r"the data recorded target layers \[3\]; the eagle head needs \[2, 2, 1\] too"):
        train_head(head, records, recorded, layers=(3,), progress=False)
    with pytest.raises(ValueError, match="2 records but features of 1"):
        train_head(head, records, recorded[:1], layers=(3,), progress=False)
    with pytest.raises(ValueError, match="give the target layers"): train_head(head, records, recorded, progress=False)
    with pytest.raises(ValueError, match="no training records"): train_head(head, [], progress=False)


def test_distill_data_is_resumable_hashed_and_recorded(tiny, tmp_path):
    kw = dict(n_batches=2, batch_size=2, max_prompt_tokens=8, max_new_tokens=8, seed=0, progress=False)
    whole = write_distill_data(tiny, tmp_path / "whole.jsonl", **kw)
    assert whole["records"] > 0 and whole["tokens"] == sum(len(r["ids"]) for r in read_data(tmp_path / "whole.jsonl")[0])
    assert whole["prompt_sources"]["magpie"]["prefix_ids"] == magpie_prefix(tiny)
    assert "builtin" in whole["excluded_evaluation_sets"]
    # an interrupted run: batch 0 finished, batch 1 torn mid-line; resuming writes batch 1 again, the same data
    lines = (tmp_path / "whole.jsonl").read_text().splitlines()
    cut = lines.index(json.dumps({"batch_done": 0}))
    (tmp_path / "part.jsonl").write_text("\n".join(lines[:cut + 2]) + "\n" + lines[cut + 2][:10])
    assert read_data(tmp_path / "part.jsonl")[1] == {0}
    resumed = write_distill_data(tiny, tmp_path / "part.jsonl", **kw)
    assert resumed["hash"] == whole["hash"] and resumed["records"] == whole["records"]
    assert json.loads((tmp_path / "part.json").read_text())["hash"] == whole["hash"]


def test_features_recorded_while_writing_equal_a_forward_over_the_data(tiny, tmp_path):
    "The layer outputs and next-token probabilities recorded inside HF's batched, left-padded generate are the target's own."
    write_distill_data(tiny, tmp_path / "d.jsonl", n_batches=2, batch_size=3, max_prompt_tokens=8, max_new_tokens=12,
                       seed=0, progress=False)
    records, _ = read_data(tmp_path / "d.jsonl")
    recorded, again = read_features(tmp_path / "d.jsonl", records), record_features(tiny, records)
    assert len(records) >= 4 and {r["mode"] for r in records} == {"greedy", "T=0.7"}
    for r, got, ref in zip(records, recorded, again):
        assert got["hidden"].shape == (len(r["ids"]) - 1, len(feature_layers(tiny.num_layers)), tiny.config.hidden_size)
        torch.testing.assert_close(got["hidden"].float(), ref["hidden"].float(), rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(got["top_probs"].float(), ref["top_probs"].float(), rtol=0, atol=2e-3)
        assert (got["top_ids"][:, 0] == ref["top_ids"][:, 0]).float().mean() > 0.9     # near-ties may swap
        if r["mode"] == "greedy":                                  # the recorded top token is the token it wrote next
            assert got["top_ids"][:, 0].tolist() == r["ids"][r["answer_start"]:]
    (tmp_path / "d.features" / "00001.safetensors").unlink()
    with pytest.raises(ValueError, match="no recorded features for batch 1"):
        read_features(tmp_path / "d.jsonl", records)


def test_evaluation_prompts_never_enter_the_data(tiny):
    prefix = magpie_prefix(tiny)
    records, _, excluded = _write_batch(tiny, 0, prefix, 2, 8, 4, 0.7, 0, set())
    assert records and excluded == 0
    evaluation = {" ".join(r["prompt"].lower().split()) for r in records}     # pretend they are evaluation prompts
    again, _, excluded = _write_batch(tiny, 0, prefix, 2, 8, 4, 0.7, 0, evaluation)
    assert again == [] and excluded == len(records)
    from specdec.prompts import builtin_prompts
    first = builtin_prompts()[0].turns[0]
    assert " ".join(first.lower().split()) in evaluation_texts()        # the built-in benchmark set is always excluded


def test_prompt_styles_begin_the_users_turn(tiny, tmp_path):
    "A style's batches hold prompts that begin with one of its starters, the target writing the rest; styles take turns by batch."
    styles = {"tr": {"starters": ["Translate into English:", "Translate into German:"], "max_prompt_tokens": 6, "one_line": False},
              "open": PROMPT_STYLES["open"]}
    manifest = write_distill_data(tiny, tmp_path / "d.jsonl", n_batches=3, batch_size=3, max_new_tokens=4, styles=styles,
                                  seed=0, progress=False)
    records, _ = read_data(tmp_path / "d.jsonl")
    assert {r["style"] for r in records} == {"tr", "open"}
    for r in records:
        assert r["style"] == ("tr" if r["batch"] % 2 == 0 else "open")
        if r["style"] == "tr":
            assert r["prompt"].startswith(("Translate into English:", "Translate into German:"))
            assert len(r["prompt"]) > len("Translate into English:")                       # the target wrote more
    assert manifest["prompt_sources"]["magpie"]["styles"] == styles
    assert manifest["records_by_style"] == {k: sum(r["style"] == k for r in records) for k in styles}
    again = write_distill_data(tiny, tmp_path / "d.jsonl", n_batches=3, batch_size=3, max_new_tokens=4, styles=styles, seed=0, progress=False)
    assert again["hash"] == manifest["hash"]                              # resumed with its settings: nothing rewritten
    with pytest.raises(ValueError, match=r"written with other settings \(styles, batch_size"):   # never mixed into one file
        write_distill_data(tiny, tmp_path / "d.jsonl", n_batches=4, batch_size=2, max_new_tokens=4, styles="open", seed=0, progress=False)
    with pytest.raises(ValueError, match="unknown prompt style.*'poetry'"):
        write_distill_data(tiny, tmp_path / "e.jsonl", n_batches=1, styles="qa,poetry", progress=False)
    with pytest.raises(ValueError, match="prompt style 'x' needs a non-empty list of starter strings"):
        write_distill_data(tiny, tmp_path / "e.jsonl", n_batches=1, styles={"x": {"starters": []}}, progress=False)


def test_training_data_from_several_files(tiny, tmp_path):
    kw = dict(batch_size=2, max_prompt_tokens=6, max_new_tokens=6, progress=False)
    write_distill_data(tiny, tmp_path / "a.jsonl", n_batches=3, styles="open", seed=0, **kw)
    write_distill_data(tiny, tmp_path / "b.jsonl", n_batches=1, styles="qa", seed=1, layers=feature_layers(tiny.num_layers)[:2], **kw)
    records, recorded, manifest = read_training_data([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], n_batches=2)
    a, b = read_data(tmp_path / "a.jsonl")[0], read_data(tmp_path / "b.jsonl")[0]
    assert records == [r for r in a if r["batch"] < 2] + b                 # the first file cut at n_batches
    assert manifest["hash"] == data_hash(records) and len(manifest["parts"]) == 2 and manifest["records"] == len(records)
    assert manifest["features"]["layers"] == list(feature_layers(tiny.num_layers)[:2])     # the layers both recorded
    assert all(rec["hidden"].shape[1] == 2 for rec in recorded)
    first = read_features(tmp_path / "a.jsonl", records[:1])[0]["hidden"]
    torch.testing.assert_close(recorded[0]["hidden"], first[:, :2])
    head = new_head("medusa", tiny, seed=0)                                # it reads the last layer, which b did not record
    with pytest.raises(ValueError, match=r"the medusa head needs \[3\]"):
        train_head(head, records, recorded, manifest["features"]["layers"], max_steps=1, progress=False)
    other = json.loads((tmp_path / "b.json").read_text()) | {"target_weights": "file-sha256:other"}
    (tmp_path / "b.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="different targets"):
        read_training_data([tmp_path / "a.jsonl", tmp_path / "b.jsonl"])
    with pytest.raises(ValueError, match="no manifest"):
        read_training_data([tmp_path / "missing.jsonl"])


def test_prompt_files_are_excluded_too(tmp_path):
    (tmp_path / "eval.jsonl").write_text(json.dumps({"question_id": 1, "category": "qa", "turns": ["What  is Zorblax?"]}) + "\n")
    assert "what is zorblax?" in evaluation_texts([tmp_path / "eval.jsonl"])
    assert "what is zorblax?" not in evaluation_texts()


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    "An EAGLE and a Medusa checkpoint trained two steps for tiny-llama, over a reduced draft vocabulary."
    root = tmp_path_factory.mktemp("heads")
    records = records_of(tiny)
    vocab = DraftVocab.most_frequent([r["ids"] for r in records], 100, tiny.vocab_size, always=tiny.eos_token_ids)
    out = {}
    for kind in ("eagle", "medusa"):
        head = new_head(kind, tiny, vocab, n=2, seed=0)
        metrics = train_head(head, records, epochs=1, lr=1e-3, batch_size=3, seed=0, progress=False)
        out[kind] = (head, save_head(head, root / kind, data={"hash": "test"}, metrics=metrics))
    return out


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_checkpoint_round_trip_through_the_registry(tiny, saved, kind):
    head, path = saved[kind]
    loaded = make_drafter(f"{kind}:{path}", tiny)
    assert type(loaded) is type(head) and loaded.draft_vocab == head.draft_vocab
    assert spec_of(loaded) == f"{kind}:{path}"
    assert loaded.dtype == torch.float16                          # `auto` on a float32 target (test_heads: still lossless)
    for name, tensor in head.state_dict().items(): torch.testing.assert_close(loaded.state_dict()[name], tensor.half())
    loaded = load_head(path, tiny, dtype="float32")               # the weights as trained
    for name, tensor in head.state_dict().items(): torch.testing.assert_close(loaded.state_dict()[name], tensor)
    config = json.loads((path / "config.json").read_text())
    assert config["head_type"] == kind and config["target"]["name"] == tiny.name and config["data"] == {"hash": "test"}
    prompt = tiny.encode("the cat sat on the mat; the cat")
    drafts = lambda h: generate(tiny, prompt, drafter=h, controller=FixedK(2), max_new_tokens=12).accepted_lengths
    assert drafts(loaded) == drafts(head)
    with pytest.raises(ValueError, match=f"holds a {kind} head"): load_head(path, tiny, "medusa" if kind == "eagle" else "eagle")


def test_corrupt_checkpoint(tiny, saved, tmp_path):
    import shutil
    path = shutil.copytree(saved["eagle"][1], tmp_path / "corrupt")
    data = bytearray((path / "head.safetensors").read_bytes())
    (path / "head.safetensors").write_bytes(b"\x07" * 16 + data[16:200])
    with pytest.raises(ValueError, match="corrupt head checkpoint .*head.safetensors"): load_head(path, tiny)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt head checkpoint .*config.json"): load_head(path, tiny)
    with pytest.raises(ValueError, match="not a head checkpoint"): load_head(tmp_path / "missing", tiny)


def test_head_trained_for_another_target(saved):
    other = tiny_llama(seed=1, name="tiny-llama-seed1")                  # same shapes, other weights
    with pytest.raises(ValueError, match=r"trained for target 'tiny-llama'.*not for 'tiny-llama-seed1'"):
        load_head(saved["medusa"][1], other)
    with pytest.raises(ValueError, match="trained for target 'tiny-llama'"): make_drafter(f"eagle:{saved['eagle'][1]}", other)


def test_mismatched_draft_vocabulary(tiny, saved, tmp_path):
    import shutil
    path = shutil.copytree(saved["medusa"][1], tmp_path / "vocab")
    config = json.loads((path / "config.json").read_text())
    config["draft_vocab"] = config["draft_vocab"][1:] + [config["draft_vocab"][0]]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="draft vocabulary in config.json does not match"): load_head(path, tiny)
    with pytest.raises(ValueError, match="outside the target's vocabulary"): DraftVocab([5, 600], tiny.vocab_size)
    with pytest.raises(ValueError, match="vocabulary of 256 ids, the target 'tiny-llama' has 512"):
        EagleHead(tiny, DraftVocab([1, 2], 256))


def test_training_notebook_runs_under_papermill(tiny, tmp_path):
    "nbs/bench/train_head.ipynb on the tiny model: its own data plus a file written before, a checkpoint the registry loads."
    import papermill as pm
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    write_distill_data(tiny, tmp_path / "before" / "data.jsonl", n_batches=1, batch_size=2, max_prompt_tokens=6, max_new_tokens=6,
                       styles="qa", seed=3, progress=False)
    params = {"target": "tiny-llama", "head_type": "eagle", "n_batches": 2, "batch_size": 2, "max_prompt_tokens": 6,
              "max_new_tokens": 8, "styles": "open,code", "epochs": 1, "draft_vocab_size": 64, "out_dir": str(tmp_path / "run"),
              "extra_data": str(tmp_path / "before" / "data.jsonl"), "tau_prompts": 2, "tau_ks": "1,2", "tau_new_tokens": 6}
    pm.execute_notebook(str(root / "nbs/bench/train_head.ipynb"), str(tmp_path / "executed.ipynb"), parameters=params,
                        kernel_name="python3", cwd=str(tmp_path), progress_bar=False)
    report = json.loads((tmp_path / "run" / "eagle" / "report.json").read_text())
    data, metrics = report["data"], report["metrics"]
    assert [part["prompt_sources"]["magpie"]["seed"] for part in data["parts"]] == [0, 3]       # both files, in order
    assert set(data["parts"][0]["records_by_style"]) == {"open", "code"} and data["parts"][1]["records_by_style"].keys() == {"qa"}
    assert data["answer_tokens"] == sum(p["answer_tokens"] for p in data["parts"])
    assert metrics["steps"] >= 1 and set(metrics["tau_heldout"]["by_k"]) == {"1", "2"}
    copying = metrics["copy_agreement"]                           # where the head copies, per prompt style of the data
    assert set(copying) == {"open", "code", "qa"} and all(c["copyable"][1] + c["other"][1] > 0 for c in copying.values())
    effect = metrics["draft_cost_effect"]                        # the same weights: reduced/full vocabulary, float16/float32
    assert {(row["draft vocabulary"].split()[0], row["head dtype"]) for row in effect} == {("reduced", "float16"), ("full", "float16"), ("reduced", "float32")}
    head = make_drafter(f"eagle:{tmp_path / 'run' / 'eagle'}", tiny)
    assert len(head.draft_vocab) <= 64 and head.config["data"]["hash"] == data["hash"]
    # continuing that checkpoint on the same data, grown to 2 layers: its draft vocabulary kept, its first loss below the
    # fresh head's (the new layer starts as the identity), recorded
    params.update(init_head=str(tmp_path / "run" / "eagle"), out_dir=str(tmp_path / "more"), data_dir=str(tmp_path / "run"), draft_vocab_size=32,
                  eagle_layers=2, copy_records=3, copy_min_tokens=4, prompt_vocab=True)     # and copies of the answers, the prompts' tokens drafted
    pm.execute_notebook(str(root / "nbs/bench/train_head.ipynb"), str(tmp_path / "more.ipynb"), parameters=params,
                        kernel_name="python3", cwd=str(tmp_path), progress_bar=False)
    more = json.loads((tmp_path / "more" / "eagle" / "report.json").read_text())["metrics"]
    assert more["init_head"]["path"] == str(tmp_path / "run" / "eagle") and more["init_head"]["steps"] == metrics["steps"]
    grown = make_drafter(f"eagle:{tmp_path / 'more' / 'eagle'}", tiny)
    assert grown.draft_vocab == head.draft_vocab and grown.num_layers == 2 and head.num_layers == 1
    assert more["num_layers"] == 2 and more["init_head"]["num_layers"] == 1 and metrics["num_layers"] == 1
    assert more["losses"][0] < metrics["losses"][0], (more["losses"], metrics["losses"])
    parts = json.loads((tmp_path / "more" / "eagle" / "report.json").read_text())["data"]["parts"]
    assert set(parts[-1]["records_by_style"]) == {"copy-repeat", "copy-translate", "copy-summarize", "copy-extract", "copy-edit"}
    assert sum(parts[-1]["records_by_style"].values()) == 3 and parts[-1]["prompt_sources"]["copy"]["settings"]["n_records"] == 3
    assert more["prompt_vocab"] and grown.prompt_vocab and not head.prompt_vocab


def test_copy_data_quotes_answers_and_copies_them(tiny, tmp_path):
    "Copy conversations quote a written answer and copy it (whole, or a run of its sentences); resumable; never an evaluation prompt's answer."
    src = tmp_path / "src.jsonl"
    write_distill_data(tiny, src, n_batches=2, batch_size=4, max_prompt_tokens=6, max_new_tokens=32, seed=0, progress=False)
    kw = dict(n_records=6, batch_size=2, seed=0, progress=False)
    made = write_copy_data(tiny, tmp_path / "copy.jsonl", src, **kw)
    records = read_data(tmp_path / "copy.jsonl")[0]
    assert made["records"] == len(records) == 6 and made["hash"] == data_hash(records)
    assert [r["style"] for r in records] == [f"copy-{t}" for t in list(COPY_TASKS) * 2][:6]
    squash = lambda text: " ".join(text.split())
    for r in records:
        answer = r["ids"][r["answer_start"]:]
        assert answer[-1] == tiny.eos_token_ids[0] and len(answer) > 1
        assert squash(tiny.tokenizer.decode(answer[:-1])) in squash(r["prompt"]), r["style"]
    both, recorded, manifest = read_training_data([src, tmp_path / "copy.jsonl"])       # trains beside the data it quotes
    fresh = record_features(tiny, records[:1], layers=manifest["features"]["layers"])[0]
    torch.testing.assert_close(recorded[len(both) - 6]["hidden"].float(), fresh["hidden"].float())
    # interrupted after batch 0: resuming writes the rest again, the same data; other settings are refused
    lines = (tmp_path / "copy.jsonl").read_text().splitlines()
    (tmp_path / "part.jsonl").write_text("\n".join(lines[:lines.index(json.dumps({"batch_done": 0})) + 1]) + "\n")
    (tmp_path / "part.json").write_text((tmp_path / "copy.json").read_text())
    assert write_copy_data(tiny, tmp_path / "part.jsonl", src, **kw)["hash"] == made["hash"]
    with pytest.raises(ValueError, match="other settings \\(seed: 0 there\\)"):
        write_copy_data(tiny, tmp_path / "part.jsonl", src, **(kw | {"seed": 1}))
    # a source prompted by an evaluation prompt is never quoted; unknown tasks and empty sources are named
    sources = read_data(src)[0]
    evaluation = {" ".join(sources[0]["prompt"].lower().split())}
    quoted = [r["source"] for r in copy_records(tiny, sources, 100, evaluation=evaluation, min_tokens=1)]
    assert {"batch": sources[0]["batch"], "row": sources[0]["row"]} not in quoted and len(quoted) == len(sources) - 1
    with pytest.raises(ValueError, match="unknown copy task"): copy_records(tiny, sources, 2, tasks=["poem"])
    with pytest.raises(ValueError, match=r"unknown copy task\(s\) \[.poem.\]"): write_copy_data(tiny, tmp_path / "c3.jsonl", src, tasks="repeat,poem", **kw)
    assert {r["style"] for r in copy_records(tiny, sources, 4, tasks="repeat, edit", min_tokens=1)} == {"copy-repeat", "copy-edit"}
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no finished batches"): write_copy_data(tiny, tmp_path / "c2.jsonl", tmp_path / "empty.jsonl", **kw)


def test_time_budgets_stop_data_and_training_and_say_so(tiny, tmp_path):
    "A time budget (a short GPU lease): data keeps the batches finished in time (the rest resumes later); training stops, fits its schedule, and says so."
    kw = dict(n_batches=3, batch_size=2, max_prompt_tokens=6, max_new_tokens=6, seed=0, progress=False)
    cut = write_distill_data(tiny, tmp_path / "data.jsonl", **kw, max_seconds=1e-9)       # one batch, then out of time
    assert (cut["batches_done"], cut["stopped"]) == (1, "time") and read_data(tmp_path / "data.jsonl")[1] == {0}
    whole = write_distill_data(tiny, tmp_path / "data.jsonl", **kw)                        # resumed without a budget
    assert (whole["batches_done"], whole["stopped"]) == (3, "done")
    assert whole["hash"] == write_distill_data(tiny, tmp_path / "again.jsonl", **kw)["hash"]   # the same data as in one go
    records = records_of(tiny, n=40)
    free = train_head(new_head("eagle", tiny, seed=0), records, epochs=2, batch_size=2, progress=False)
    assert (free["steps"], free["planned_steps"], free["stopped"]) == (40, 40, "done")
    timed = train_head(new_head("eagle", tiny, seed=0), records, epochs=2, batch_size=2, progress=False, max_seconds=1e-9)
    assert (timed["steps"], timed["planned_steps"], timed["stopped"], timed["max_seconds"]) == (1, 40, "time", 1e-9)


def test_a_time_budget_fits_the_schedule_to_the_steps_that_fit(tiny, monkeypatch):
    "After FIT_AFTER steps their pace sets the planned steps: a clock of 1 s per step and 25 s give 25 steps of the 40 planned."
    import types, itertools, specdec.train as train
    clock = itertools.count()
    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    got = train_head(new_head("eagle", tiny, seed=0), records_of(tiny, n=40), epochs=2, batch_size=2, progress=False, max_seconds=25)
    assert (got["steps"], got["planned_steps"], got["stopped"]) == (25, 40, "time")
    # a clock that stops after the fit: the fitted steps end the run before the budget does, and it still says "time"
    ticks = itertools.chain(range(11), itertools.repeat(10))
    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    got = train_head(new_head("eagle", tiny, seed=0), records_of(tiny, n=40), epochs=2, batch_size=2, progress=False, max_seconds=25)
    assert (got["steps"], got["planned_steps"], got["stopped"]) == (25, 40, "time")
