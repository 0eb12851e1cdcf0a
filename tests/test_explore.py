"The explorer driven from Python: set the controls, click, and read what it renders."
import json, re, shutil, threading, time
from pathlib import Path
import pytest, torch
from specdec.explore import Explorer, first_difference, token_trace, decode_stats
from specdec.decode import generate, StepEvent
from specdec.specs import load_target

ROOT = Path(__file__).resolve().parents[1]

def spans(ex):
    "The rendered token spans: (kind, tooltip) per token."
    return re.findall(r'class="sd-tok sd-(\w+)"[^>]*title="([^"]*)"', ex.tokens_view.value)

def test_tiny_model_run_renders_tokens_stats_and_badge():
    ex = Explorer(model="tiny-llama", prompt="abcabcabcabcabc")
    ex.drafter.value, ex.k.value, ex.max_new_tokens.value, ex.chat.value = "pld", "4", 20, False
    ex.run_button.click(); ex.wait(120)
    assert ex.error is None and ex.status.value == "done"
    got = spans(ex)
    assert len(got) == 20 and all(kind in ("draft", "correction", "bonus", "target") for kind, _ in got)
    assert all(tip.startswith(f"step ") for _, tip in got)
    assert "20</b> tokens" in ex.stats_view.value and "sd-identical" in ex.compare_view.value
    assert ex.reference == [t.token for t in ex.trace]
    drafted = [a + r for a, r in zip(ex.figure.data[0].y, ex.figure.data[1].y)]   # accepted + rejected bars
    assert drafted == [e.proposed for e in ex.events]

def test_smollm2_copies_with_drafts_and_matches_no_draft():
    ex = Explorer(model="smollm2-135m", prompt="Repeat exactly, word for word: the quick brown fox jumps over the lazy "
                  "dog while the cat sleeps on the warm red mat by the door.")
    ex.drafter.value, ex.k.value, ex.max_new_tokens.value = "pld", "4", 32
    ex.run_button.click(); ex.wait(300)
    assert ex.error is None, ex.error
    kinds = [k for k, _ in spans(ex)]
    assert "draft" in kinds and ("bonus" in kinds or "correction" in kinds)
    assert "sd-identical" in ex.compare_view.value                         # lossless: equal to no-draft decoding
    stats = ex.stats_view.value
    tau = float(re.search(r"τ <b>([\d.]+)</b>", stats).group(1))
    assert tau > 1.2                                                       # copying pays: more than one token per step

def test_draft_probabilities_show_in_tooltips():
    ex = Explorer(model="tiny-llama", prompt="hello hello hello")
    ex.drafter.value, ex.k.value, ex.max_new_tokens.value, ex.chat.value = "model:tiny-llama-draft", "3", 16, False
    ex.run(wait=True); ex.wait(120)
    assert ex.error is None, ex.error
    drafted = [tip for kind, tip in spans(ex) if kind == "draft"]
    assert drafted and all("p_draft=" in tip for tip in drafted)

def test_stop_ends_a_long_generation_cleanly():
    ex = Explorer(model="tiny-llama", prompt="abc")
    ex.drafter.value, ex.k.value, ex.max_new_tokens.value, ex.chat.value = "none", "4", 4000, False
    ex.run_button.click()
    deadline = time.time() + 60
    while len(ex.events) < 3 and time.time() < deadline: time.sleep(0.01)
    ex.stop_button.click(); ex.wait(60)
    assert ex.status.value == "stopped" and 3 <= len(ex.trace) < 4000
    assert not ex.run_button.disabled and ex.stop_button.disabled

def test_bad_settings_show_a_message_and_run_nothing():
    ex = Explorer(model="tiny-llama", prompt="abc")
    ex.drafter.value = "layerskip"
    ex.run_button.click(); ex.wait(10)
    assert "layerskip needs a layer count" in ex.status.value and ex.events == []
    ex.drafter.value, ex.policy.value, ex.temperature.value = "pld", "greedy", 0.7
    ex.run(wait=True)
    assert "Greedy policy needs temperature=0" in ex.status.value
    ex.prompts_file.value = "/nonexistent.jsonl"
    assert "nonexistent" in ex.status.value

def test_picking_a_builtin_prompt_fills_the_box():
    ex = Explorer(model="tiny-llama")
    value = ex.pick.options[1][1]
    ex.pick.value = value
    assert ex.prompt.value and ex.prompt.value in [p.turns[0] for p in ex._prompt_set]

def test_on_step_events_add_up_to_the_output():
    from specdec.specs import load_target, make_drafter
    tiny = load_target("tiny-llama")
    prompt = tiny.encode("abcabcabcabc")
    events = []
    out = generate(tiny, prompt, drafter=make_drafter("pld", tiny), max_new_tokens=24, on_step=events.append)
    assert sum((e.emitted for e in events), []) == out.tokens[0].tolist()
    assert sum(e.accepted for e in events) == out.stats.accepted and len(events) == out.stats.target_forwards
    assert [t.kind for t in token_trace(events)].count("draft") == out.stats.accepted
    stopped = generate(tiny, prompt, max_new_tokens=24, on_step=lambda e: e.step < 4)
    assert stopped.tokens.shape[1] == 5 and torch.equal(stopped.tokens[0], out.tokens[0, :5])


def test_shown_figures_are_the_decodes_own_stats():
    "tok/s, τ and the counts shown at the end are the generation's own `Stats`, not a rate taken by the page."
    ex = Explorer(model="tiny-llama", prompt="abcabcabcabcabc")
    ex.drafter.value, ex.k.value, ex.max_new_tokens.value, ex.chat.value = "pld", "4", 24, False
    ex.run(wait=True)
    stats = ex.output.stats
    assert ex.error is None and ex.shown == decode_stats(stats)
    assert ex.shown["tok/s"] == stats.new_tokens / stats.wall_time and ex.shown["tau"] == stats.tau
    assert f"<b>{stats.tokens_per_second:.1f}</b> tok/s" in ex.stats_view.value and f"τ <b>{stats.tau:.2f}</b>" in ex.stats_view.value
    assert f"<b>{stats.new_tokens}</b> tokens in <b>{stats.target_forwards}</b> steps" in ex.stats_view.value


def test_step_callback_only_records_the_step():
    "The callback runs inside the timed loop: it must leave the page alone (a separate thread refreshes it)."
    ex = Explorer(model="tiny-llama")
    views = [ex.tokens_view.value, ex.stats_view.value, ex.progress.value, ex.status.value, list(ex.figure.data[0].y or [])]
    event = StepEvent(step=0, proposed=2, accepted=1, draft_tokens=[5, 6], draft_probs=None, emitted=[5, 7])
    assert ex._on_step(event) is True and ex.events == [event]
    assert [ex.tokens_view.value, ex.stats_view.value, ex.progress.value, ex.status.value, list(ex.figure.data[0].y or [])] == views
    ex.stop(); assert ex._on_step(event) is False                         # Stop ends the generation at the next step


def test_run_is_disabled_and_says_loading_while_the_model_loads():
    release, tiny = threading.Event(), load_target("tiny-llama")
    def slow_load(name):
        release.wait(30); return tiny
    ex = Explorer(model="tiny-llama", prompt="abcabc", load_model=slow_load)
    ex.max_new_tokens.value, ex.chat.value = 8, False
    ex.run_button.click()
    assert ex.busy and ex.run_button.disabled and "loading model tiny-llama" in ex.status.value
    ex.run_button.click()                                                 # a second click while busy does nothing
    release.set(); ex.wait(60)
    assert not ex.busy and not ex.run_button.disabled and ex.status.value == "done" and len(ex.trace) == 8
    ex.run(wait=True)                                                     # the model is loaded once
    assert ex.status.value == "done"


def test_sampled_decoding_is_not_called_a_failure():
    "At temperature > 0 the outputs differ from no-draft decoding by design: a neutral note, not a red badge."
    ex = Explorer(model="tiny-llama", prompt="abcabcabcabc")
    ex.drafter.value, ex.k.value, ex.max_new_tokens.value, ex.chat.value, ex.temperature.value = "pld", "4", 16, False, 0.8
    ex.run(wait=True)
    assert ex.error is None and ex.status.value == "done" and ex.reference is None
    assert "sd-sampled" in ex.compare_view.value and "by design" in ex.compare_view.value and "lossless" in ex.compare_view.value
    assert "sd-differs" not in ex.compare_view.value and "sd-identical" not in ex.compare_view.value
    ex.policy.value = "typical"
    ex.run(wait=True)
    assert "the policy is lossy" in ex.compare_view.value


def test_prompt_paths_from_the_repository_root_or_the_notebook_folder(tmp_path):
    root, notebooks = tmp_path / "repo", tmp_path / "repo" / "nbs"
    notebooks.mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "fixtures" / "spec_bench_sample.jsonl", notebooks / "mine.jsonl")
    ex = Explorer(model="tiny-llama", roots=[root, notebooks])
    ex.prompts_file.value = "mine.jsonl"                                  # found in the notebook's folder
    assert ex.status.value == "" and str(notebooks / "mine.jsonl") in ex.prompts_info.value
    ex.prompts_file.value = "nbs/mine.jsonl"                              # the same file from the repository root
    assert str(notebooks / "mine.jsonl") in ex.prompts_info.value
    ex.prompts_file.value = "missing.jsonl"
    assert "looked for" in ex.status.value and str(root / "missing.jsonl") in ex.status.value
    assert str(notebooks / "missing.jsonl") in ex.status.value and "sd-error" in ex.status.value
    ex.prompts_file.value = "builtin"                                     # a set that loads clears the message
    assert ex.status.value == "" and "the built-in set" in ex.prompts_info.value


def test_long_errors_wrap_inside_the_controls():
    ex = Explorer(model="tiny-llama")
    ex.prompts_file.value = "/" + "very-long-folder-name/" * 12 + "prompts.jsonl"
    assert 'class="sd-error"' in ex.status.value and "overflow-wrap:anywhere" in ex.status.value
    assert all(w.layout.width == "100%" for w in (ex.model, ex.drafter, ex.prompt, ex.status, ex.prompts_file))


def test_explorer_notebook_is_kept_free_of_outputs():
    "nbs/explore.ipynb is tracked without outputs; the Jupyter server of .venv drops them when JupyterLab saves it."
    nb = json.loads((ROOT / "nbs" / "explore.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and "outputs-not-saved" in c["metadata"].get("tags", []) for c in code)
    config = {}
    class C:                                                              # the `c` a Jupyter config file receives
        def __getattr__(self, name): return config.setdefault(name, type("Section", (), {})())
    exec((ROOT / ".ci" / "jupyter_server_config.py").read_text(), {"c": C()})
    hook = config["ContentsManager"].pre_save_hook
    saved = {"type": "notebook", "content": {"metadata": {"widgets": {"state": {}}}, "cells": [
        {"cell_type": "code", "metadata": {"tags": ["outputs-not-saved"]}, "outputs": [{"output_type": "stream"}], "execution_count": 3},
        {"cell_type": "code", "metadata": {}, "outputs": [{"output_type": "stream"}], "execution_count": 4}]}}
    hook(model=saved, path="nbs/explore.ipynb", contents_manager=None)
    first, second = saved["content"]["cells"]
    assert first["outputs"] == [] and first["execution_count"] is None and "widgets" not in saved["content"]["metadata"]
    assert second["outputs"] and second["execution_count"] == 4          # untagged cells keep theirs
