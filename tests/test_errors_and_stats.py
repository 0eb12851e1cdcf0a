"Bad input raises an error naming the problem; Stats add up."
import math, subprocess, sys, pytest, torch
from specdec import generate, load_model
from specdec.models import tiny_llama
from specdec.drafters import PromptLookup, DraftModel, LayerSkip
from specdec.specs import make_drafter
from specdec.stats import Stats
from specdec.controllers import FixedK, AdaptiveK
from specdec.policies import Greedy, ConfidenceThreshold
from specdec.cli import main


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'definitely-not-a-model'"): load_model("definitely-not-a-model")
    with pytest.raises(ValueError, match="no such .gguf file"): load_model("/nope/missing.gguf")


def test_mismatched_vocabulary_names_both_models(tiny):
    other = tiny_llama(vocab_size=300, name="small-vocab")
    with pytest.raises(ValueError, match="draft model 'small-vocab' and target 'tiny-llama' do not share a vocabulary"):
        generate(tiny, tiny.encode("abc"), drafter=DraftModel(other))


def test_layerskip_on_another_target(tiny, tiny_draft):
    with pytest.raises(ValueError, match="LayerSkip was built on 'tiny-llama'"):
        generate(tiny_draft, tiny_draft.encode("abc"), drafter=LayerSkip(tiny, 2))


@pytest.mark.parametrize("k", [0, -1, 2.5])
def test_bad_k(k):
    with pytest.raises(ValueError, match="K >= 1"): FixedK(k)


def test_bad_adaptive_bounds():
    with pytest.raises(ValueError, match="k_min <= k_init <= k_max"): AdaptiveK(k_init=9, k_max=8)


def test_empty_prompt(tiny):
    with pytest.raises(ValueError, match="empty prompt"): generate(tiny, [])
    with pytest.raises(ValueError, match="empty prompt"): generate(tiny, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty prompt"): tiny.encode("   ")


@pytest.mark.parametrize("temperature", [-0.5, float("nan")])
def test_bad_temperature(tiny, temperature):
    with pytest.raises(ValueError, match="temperature must be >= 0"): generate(tiny, tiny.encode("abc"), temperature=temperature)


@pytest.mark.parametrize("top_p", [0.0, -0.1, 1.01])
def test_bad_top_p(tiny, top_p):
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"): generate(tiny, tiny.encode("abc"), top_p=top_p)


def test_bad_max_new_tokens_and_policy(tiny):
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"): generate(tiny, tiny.encode("a"), max_new_tokens=0)
    with pytest.raises(ValueError, match="Greedy policy needs temperature=0"):
        generate(tiny, tiny.encode("a"), policy=Greedy(), temperature=0.8)
    with pytest.raises(ValueError, match="threshold must be in"): ConfidenceThreshold(0)


def test_bad_drafter_spec(tiny):
    with pytest.raises(ValueError, match="unknown drafter 'hydra'"): make_drafter("hydra", tiny)
    with pytest.raises(ValueError, match="no eagle head ships for target 'tiny-llama'"): make_drafter("eagle", tiny)
    with pytest.raises(ValueError, match="eagle needs a head checkpoint folder"): make_drafter("eagle:", tiny)
    with pytest.raises(ValueError, match="layerskip needs a layer count"): make_drafter("layerskip:x", tiny)


def test_cli_reports_errors(capsys):
    assert main(["generate", "--model", "tiny-llama", "--k", "0", "--prompt", "abc"]) == 2
    assert "K >= 1" in capsys.readouterr().err
    assert main(["generate", "--model", "tiny-llama", "--prompt", ""]) == 2
    assert "empty prompt" in capsys.readouterr().err
    assert main(["generate", "--model", "nope-model", "--prompt", "abc"]) == 2
    assert "unknown model 'nope-model'" in capsys.readouterr().err


def test_cli_prints_text_and_stats():
    run = subprocess.run([sys.executable, "-c", "from specdec.cli import main; raise SystemExit(main())", "generate", "--model", "tiny-llama", "--drafter", "pld",
                          "--k", "4", "--max-new-tokens", "20", "--prompt", "abcabcabc"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "tau (tokens/target forward)" in run.stdout and "accepted-length histogram" in run.stdout


@pytest.mark.parametrize("drafter", ["pld", "layerskip:2", "model:tiny-llama-draft", None])
def test_stats_add_up(tiny, drafter):
    d = make_drafter(drafter, tiny)
    total = None
    for text in ["the cat sat on the mat, the cat sat on the", "0123456789 0123456789 01234", "xyz"]:
        s = generate(tiny, tiny.encode(text), drafter=d, controller=FixedK(4) if d else None, max_new_tokens=30).stats
        assert s.accepted + s.rejected == s.proposed
        assert sum(s.accepted_hist) == s.target_forwards
        assert math.isclose(s.tokens_per_second, s.new_tokens / s.wall_time)
        assert s.new_tokens <= s.accepted + s.target_forwards
        assert sum(s.proposed_by_position) == s.proposed and sum(s.accepted_by_position) == s.accepted
        assert s.draft_time + s.verify_time <= s.wall_time
        total = s if total is None else total + s
    assert sum(total.accepted_hist) == total.target_forwards and total.generations == 3
    if d is None: assert total.proposed == 0 and total.tau == 1.0


def test_stats_round_trip_through_a_record(tiny):
    "A benchmark record holds a generation's Stats and gives back the same Stats (through JSON too)."
    import json
    s = generate(tiny, tiny.encode("the cat sat on the mat, the cat sat"), drafter=PromptLookup(), controller=FixedK(4),
                 max_new_tokens=20).stats
    record = {"prompt_id": "p", "method": "pld/k4", "tokens": [1, 2], **s.to_record()}
    back = Stats.from_record(json.loads(json.dumps(record)))
    assert back == s and back.tau == s.tau and back.per_position_acceptance == s.per_position_acceptance
    assert sum([Stats.from_record(record)] * 2, Stats()).target_forwards == 2 * s.target_forwards
    with pytest.raises(ValueError, match="not a Stats record"): Stats.from_record({"new_tokens": 1})
