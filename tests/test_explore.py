"The explorer driven from Python: set the controls, click, and read what it renders."
import re, time
import pytest, torch
from specdec.explore import Explorer, first_difference, token_trace
from specdec.decode import generate

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
