"The spec language: names round-trip to canonical specs and back to equal objects; bad specs name the problem."
from pathlib import Path
import re
import pytest, torch
from specdec import specs
from specdec.specs import (DRAFTERS, POLICIES, CONTROLLERS, Registry, Arg, load_target, make_drafter, make_policy,
                           make_controller, validate, spec_of, help_text)
from specdec.models import LoadedModel
from specdec.net import DecoderNet
from specdec.costmodel import StepCosts
from specdec.controllers import CostAwareK
from specdec.synthetic import SyntheticTarget

# (kind, spec as a user writes it, canonical spec)
HEADS = Path(__file__).resolve().parent / "fixtures" / "heads"   # tiny-llama head checkpoints (fixtures/make_heads.py)
CASES = [
    ("drafter", "pld", "pld:3"), ("drafter", "pld:3", "pld:3"), ("drafter", " PLD:2 ", "pld:2"),
    ("drafter", "pld:3:2", "pld:3:2"), ("drafter", "pld:4:1", "pld:4"),
    ("drafter", "layerskip:2", "layerskip:2"), ("drafter", "layerskip:3", "layerskip:3"),
    ("drafter", "model:tiny-llama-draft", "model:tiny-llama-draft"),
    ("drafter", "synthetic", "synthetic:0.8"), ("drafter", "synthetic:0.90", "synthetic:0.9"),
    ("drafter", "synthetic:0.9/0.7", "synthetic:0.9/0.7"),
    ("drafter", f"eagle:{HEADS}/eagle-tiny", f"eagle:{HEADS}/eagle-tiny"),
    ("drafter", f" Medusa:{HEADS}/medusa-tiny", f"medusa:{HEADS}/medusa-tiny"),
    ("drafter", f"eagle-tree:4:10:{HEADS}/eagle-tiny", f"eagle-tree:4:10:{HEADS}/eagle-tiny"),
    ("drafter", f"eagle-tree:2:6:{HEADS}/eagle-tiny", f"eagle-tree:2:6:{HEADS}/eagle-tiny"),
    ("drafter", f"medusa-tree:3:8:{HEADS}/medusa-tiny", f"medusa-tree:3:8:{HEADS}/medusa-tiny"),
    ("drafter", f"eagle3:{HEADS}/eagle3-tiny", f"eagle3:{HEADS}/eagle3-tiny"),
    ("drafter", f"eagle3-tree:2:6:{HEADS}/eagle3-tiny", f"eagle3-tree:2:6:{HEADS}/eagle3-tiny"),
    ("drafter", f"medusa1:{HEADS}/medusa1-tiny", f"medusa1:{HEADS}/medusa1-tiny"),
    ("drafter", f"Medusa1-tree:3:8:{HEADS}/medusa1-tiny", f"medusa1-tree:3:8:{HEADS}/medusa1-tiny"),
    ("drafter", "suffix", "suffix:2:0.1"), ("drafter", "Suffix:1", "suffix:1:0.1"), ("drafter", "suffix:1.5:0.25", "suffix:1.5:0.25"),
    ("drafter", "suffix:1:0.1:0", "suffix:1:0.1"), ("drafter", "suffix:2:0.1:3", "suffix:2:0.1:3"),
    ("drafter", "suffix:1:0.1:0:24:5000", "suffix:1:0.1:0:24:5000"), ("drafter", "suffix:1:0.1:0:32", "suffix:1:0.1:0:32"),
    ("drafter", "suffix-tree", "suffix-tree:8:2:0.1"), ("drafter", "suffix-tree:6:2", "suffix-tree:6:2:0.1"),
    ("drafter", "suffix-tree:4:1:0.2:1:24:0", "suffix-tree:4:1:0.2:1:24:0"),
    ("policy", "greedy", "greedy"), ("policy", "REJECTION", "rejection"), ("policy", "typical", "typical"),
    ("policy", "typical:0.09", "typical"), ("policy", "typical:0.2", "typical:0.2"), ("policy", "typical:0.09:0.5", "typical:0.09:0.5"),
    ("policy", "confidence", "confidence:0.1"), ("policy", "confidence:0.25", "confidence:0.25"),
    ("policy", "topk", "topk:2"), ("policy", "topk:3", "topk:3"),
    ("controller", 4, "fixed:4"), ("controller", "2", "fixed:2"), ("controller", "fixed", "fixed:4"),
    ("controller", "fixed:6", "fixed:6"), ("controller", "adaptive", "adaptive:16"), ("controller", "adaptive:8", "adaptive:8"),
    ("controller", "cost", "cost:8"), ("controller", "Cost:5", "cost:5"),
    ("controller", "dynamic", "dynamic:8"), ("controller", "dynamic:6:0.25", "dynamic:6:0.25"), ("controller", "dynamic:8:0.1", "dynamic:8"),
]
REGISTRIES = {"drafter": DRAFTERS, "policy": POLICIES, "controller": CONTROLLERS}


@pytest.fixture(scope="module")
def made(tiny):
    return {"drafter": lambda s: make_drafter(s, tiny), "policy": make_policy, "controller": make_controller}


def settings(obj) -> dict:
    "The plain values an object holds (numbers, strings, lists; the draft model's name), for comparing two objects."
    plain = {k: v for k, v in vars(obj).items() if isinstance(v, (int, float, str, list, tuple, type(None)))}
    if isinstance(getattr(obj, "draft", None), LoadedModel): plain["draft"] = obj.draft.name
    return plain


def test_every_registered_name_has_cases():
    for kind, registry in REGISTRIES.items():
        assert {validate(kind, s).split(":")[0] for k, s, _ in CASES if k == kind} == set(registry), kind


@pytest.mark.parametrize("kind, spec, canonical", CASES, ids=[f"{k}-{s}" for k, s, _ in CASES])
def test_round_trip(made, kind, spec, canonical):
    assert validate(kind, spec) == canonical
    obj = made[kind](spec)
    assert spec_of(obj) == canonical
    again = made[kind](spec_of(obj))
    assert type(again) is type(obj) and settings(again) == settings(obj)
    assert validate(kind, canonical) == canonical                       # canonical specs are fixed points


def test_round_trip_reads_the_object(tiny):
    "spec_of reads the object's own settings, so it also names objects built directly."
    from specdec.drafters import PromptLookup, LayerSkip
    from specdec.policies import Typical
    from specdec.controllers import AdaptiveK
    assert spec_of(PromptLookup(5, 2)) == "pld:5:2" and spec_of(LayerSkip(tiny, 1)) == "layerskip:1"
    assert spec_of(Typical(0.2, 0.3)) == "typical:0.2" and spec_of(AdaptiveK(k_max=12)) == "adaptive:12"


@pytest.mark.parametrize("spec", [None, "", "none", "ar", " AR "])
def test_no_drafter(tiny, spec):
    assert make_drafter(spec, tiny) is None and validate("drafter", spec) == "none"
    assert spec_of(None) == "none" and make_drafter(spec_of(None), tiny) is None


def test_no_policy():
    assert make_policy(None) is None and make_policy("") is None and validate("policy", None) == "none"


@pytest.mark.parametrize("kind, spec, message", [
    ("drafter", "eagle:", "eagle needs a head checkpoint folder, e.g. eagle:heads/eagle-tiny (got 'eagle:')"),
    ("drafter", "hydra", "unknown drafter 'hydra': use none, pld[:MAX_NGRAM[:MIN_NGRAM]], layerskip:N, model:NAME, synthetic"),
    ("drafter", "layerskip", "layerskip needs a layer count, e.g. layerskip:8 (got 'layerskip')"),
    ("drafter", "layerskip:x", "layerskip needs a layer count, e.g. layerskip:8 (got 'layerskip:x')"),
    ("drafter", "pld:x", "pld needs an integer n-gram length, e.g. pld:3 (got 'pld:x')"),
    ("drafter", "pld:3:2:1", "drafter 'pld:3:2:1' has too many arguments: the form is pld[:MAX_NGRAM[:MIN_NGRAM]]"),
    ("drafter", "pld:1:2", "drafter 'pld:1:2': need 1 <= min_ngram <= max_ngram"),
    ("drafter", "model:", "model needs a model name, e.g. model:tiny-llama-draft"),
    ("drafter", "synthetic:1.5", "drafter 'synthetic:1.5': acceptance rates must be in [0, 1]"),
    ("drafter", "synthetic:0.9/x", "synthetic needs acceptance rates in"),
    ("policy", "nope", "unknown policy 'nope': use none, greedy, rejection, typical"),
    ("policy", "greedy:2", "policy 'greedy:2' has too many arguments: the form is greedy"),
    ("policy", "confidence:2", "policy 'confidence:2': threshold must be in (0, 1]"),
    ("policy", "topk:0", "k must be a positive integer"),
    ("controller", "0", "controller '0': K must be a positive integer (K >= 1)"),
    ("controller", "-2", "K >= 1"),
    ("controller", "", "unknown controller '': use K, fixed[:K], adaptive[:K_MAX], cost[:K_MAX]"),
    ("controller", "fixed:abc", "fixed needs an integer K, e.g. fixed:4 (got 'fixed:abc')"),
    ("controller", "turbo", "unknown controller 'turbo'"),
    ("controller", "dynamic:8:1.5", "controller 'dynamic:8:1.5': stop_below must be a probability in (0, 1), got 1.5"),
    ("controller", "dynamic:8:x", "dynamic needs a probability, e.g. dynamic:8:0.1 (got 'dynamic:8:x')"),
    ("widget", "x", "unknown kind 'widget': use drafter, policy, controller"),
    ("drafter", "foo+pld", "drafter 'foo+pld': 'foo' is not a drafter: use none, pld[:MAX_NGRAM[:MIN_NGRAM]]"),
    ("drafter", "pld+", "drafter 'pld+': '' is not a drafter"),
    ("drafter", "pld:x+eagle", "pld needs an integer n-gram length, e.g. pld:3 (got 'pld:x')"),
    ("drafter", "eagle-tree:x", "eagle-tree needs an integer tree width, e.g. eagle-tree:4:10 (got 'eagle-tree:x')"),
    ("drafter", "eagle-tree:4:many", "eagle-tree needs an integer node count, e.g. eagle-tree:4:10 (got 'eagle-tree:4:many')"),
    ("drafter", "suffix:x", "suffix needs a number > 0 (drafts per matched token), e.g. suffix:2:0.1 (got 'suffix:x')"),
    ("drafter", "suffix:0", "drafter 'suffix:0': SuffixDecoding needs max_spec_factor > 0"),
    ("drafter", "suffix:1:1.5", "drafter 'suffix:1:1.5': SuffixDecoding needs 0 <= min_token_prob <= 1"),
    ("drafter", "suffix:1:0.1:0:24:1e6", "suffix needs an integer token count, e.g. suffix:2:0.1 (got 'suffix:1:0.1:0:24:1e6')"),
    ("drafter", "suffix:1:0.1:0:24:10:2", "drafter 'suffix:1:0.1:0:24:10:2' has too many arguments: the form is "
                                          "suffix[:MAX_SPEC_FACTOR[:MIN_TOKEN_PROB[:MIN_SCORE[:MAX_DEPTH[:MAX_CACHED_TOKENS]]]]]"),
    ("drafter", "suffix-tree:0", "drafter 'suffix-tree:0': a suffix tree needs NODES >= 1, got 0"),
])
def test_bad_specs_name_the_problem(kind, spec, message):
    with pytest.raises(ValueError, match=re.escape(message)): validate(kind, spec)


def test_errors_that_need_the_target(tiny):
    assert validate("drafter", "layerskip:9") == "layerskip:9"           # validate loads no model
    assert validate("drafter", "eagle") == "eagle" and validate("drafter", "medusa") == "medusa"   # the shipped heads
    with pytest.raises(ValueError, match=r"no eagle head ships for target 'tiny-llama' \(shipped: .*\); train one with "
                                         r"nbs/bench/train_head.ipynb and pass eagle:PATH"):
        make_drafter("eagle", tiny)
    with pytest.raises(ValueError, match="drafter 'layerskip:9': LayerSkip needs 1 <= num_layers < 4"):
        make_drafter("layerskip:9", tiny)
    with pytest.raises(ValueError, match="unknown model 'no-such-model-xyz'"): make_drafter("model:no-such-model-xyz", tiny)


def test_joined_drafters_round_trip(tiny):
    "`A+B` makes a Fallback of A then B; its canonical spec joins theirs; a '+' inside a name or path stays in it."
    from specdec.drafters import Fallback, PromptLookup, LayerSkip
    assert validate("drafter", "pld+layerskip:2") == "pld:3+layerskip:2"
    drafter = make_drafter(" PLD:3:2 + layerskip:2", tiny)
    assert isinstance(drafter, Fallback) and [type(d) for d in drafter.drafters] == [PromptLookup, LayerSkip]
    assert spec_of(drafter) == "pld:3:2+layerskip:2" and drafter.name == "pld:3:2+layerskip:2"   # its name is its spec
    again = make_drafter(spec_of(drafter), tiny)
    assert spec_of(again) == spec_of(drafter) and [settings(d) for d in again.drafters[:1]] == [settings(drafter.drafters[0])]
    assert validate("drafter", f"medusa:{HEADS}/medusa-tiny+pld:2") == f"medusa:{HEADS}/medusa-tiny+pld:2"
    assert validate("drafter", "model:org/a+b") == "model:org/a+b"        # one model whose name holds a '+'
    with pytest.raises(ValueError, match="Fallback needs two or more drafters"): Fallback([PromptLookup()])


def test_spec_of_unregistered_class():
    from specdec.policies import Greedy
    class Mine(Greedy): pass
    with pytest.raises(ValueError, match="Mine is not a registered policy class"): spec_of(Mine())
    with pytest.raises(ValueError, match="int is not a drafter, policy or controller"): spec_of(3)


def test_help_lists_every_form_with_its_line():
    for kind, registry in REGISTRIES.items():
        text = help_text(kind)
        for name in registry:
            entry = registry.entries[name]
            assert any(entry.grammar in line and entry.help in line for line in text.splitlines()), (kind, name)
    assert "none | ar" in help_text("drafter") and "the same as fixed:K" in help_text("controller")
    assert any(line.split()[:1] == ["SPEC+SPEC..."] and "the first drafter's draft where it has one" in line
               for line in help_text("drafter").splitlines())


def test_costs_passed_to_cost_controller():
    costs = StepCosts({1: 0.01, 2: 0.011})
    assert make_controller("cost:4", costs=costs).costs is costs
    assert make_controller("cost:4").costs is None
    assert make_controller("fixed:4", costs=costs).k == 4                  # other controllers ignore costs


def test_cost_controller_measures_once_per_pair(monkeypatch):
    import specdec.controllers as controllers
    calls = []
    def fake(target, drafter, **kw):
        calls.append((target, drafter)); return StepCosts({1: 0.01})
    monkeypatch.setattr(controllers, "measure_step_costs", fake)
    assert not any(isinstance(v, dict) for v in vars(CostAwareK).values())   # no class-level cache
    a, b, d = object(), object(), object()
    c = CostAwareK(4)
    c.start(a, d); c.start(a, d)
    assert calls == [(a, d)] and c.costs_at(1).verify == {1: 0.01}
    c.start(b, d)                                                           # another pair: measured again
    assert calls == [(a, d), (b, d)]
    CostAwareK(4).start(a, d)                                              # a new instance shares nothing
    assert len(calls) == 3
    given = CostAwareK(4, costs=StepCosts({1: 0.02}))
    given.start(a, d)
    assert len(calls) == 3 and given.costs.verify == {1: 0.02}


def test_register_a_drafter_in_one_call(tiny):
    from specdec.drafters import Drafter, Draft
    from specdec.decode import generate
    class RepeatLast(Drafter):
        def __init__(self, times=1): self.times = times
        def propose(self, tokens, k, sampling=None, generator=None): return Draft(tokens[:, -1:].expand(-1, k))
    DRAFTERS.register("repeat", lambda times, **_: RepeatLast(times), Arg("TIMES", int, "times", 1, "an integer"),
                      help="the last token again", cls=RepeatLast)
    try:
        assert validate("drafter", "repeat") == "repeat:1" and "repeat[:TIMES]" in help_text("drafter")
        d = make_drafter("repeat:2", tiny)
        assert spec_of(d) == "repeat:2"
        prompt = tiny.encode("zzzzzzzz")
        assert torch.equal(generate(tiny, prompt, drafter=d, max_new_tokens=12).tokens,
                           generate(tiny, prompt, max_new_tokens=12).tokens)
        with pytest.raises(ValueError, match="drafter 'repeat' is already registered"):
            DRAFTERS.register("repeat", lambda **_: None, help="")
    finally: DRAFTERS.unregister("repeat")
    with pytest.raises(ValueError, match="unknown drafter 'repeat'"): validate("drafter", "repeat")


def test_load_target():
    dry = load_target("synthetic")
    assert isinstance(dry, SyntheticTarget) and dry.net is dry.net
    tiny = load_target("tiny-llama")
    assert isinstance(tiny, LoadedModel) and isinstance(tiny.net, DecoderNet) and tiny.net is tiny.net
    assert "net" not in tiny.__dataclass_fields__ and "DecoderNet" not in repr(tiny)   # not a dataclass field
    with pytest.raises(ValueError, match="unknown model 'no-such-model-xyz'"): load_target("no-such-model-xyz")


def test_spec_language_lives_above_the_modules_it_names():
    "The lower modules no longer parse specs: the registry replaced drafter_from_spec/controller_from_spec/POLICIES."
    import specdec.controllers as controllers, specdec.models as models
    assert not hasattr(controllers, "controller_from_spec") and "synthetic" not in models.ZOO
