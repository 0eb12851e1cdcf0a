"""The shipped heads' config.json is metadata read on any machine: it names no path of the machine that trained them
(paths are relative to the repository root), and the shipped heads still load for their target."""
import json, re
from pathlib import Path
from specdec.heads import SHIPPED_HEADS

ABSOLUTE = re.compile(r"^(/|~|[A-Za-z]:[\\/])")                  # POSIX, home, or Windows absolute paths

def strings(value, where="") -> list[tuple[str, str]]:
    "Every string in a JSON value, with where it is (`data.parts[0].excluded_evaluation_sets[1]`)."
    if isinstance(value, str): return [(where, value)]
    if isinstance(value, dict): return [s for k, v in value.items() for s in strings(v, f"{where}.{k}" if where else k)]
    if isinstance(value, list): return [s for i, v in enumerate(value) for s in strings(v, f"{where}[{i}]")]
    return []

def test_no_shipped_head_config_names_an_absolute_path():
    configs = sorted(SHIPPED_HEADS.glob("*/config.json"))
    assert len(configs) >= 2
    for config in configs:
        found = strings(json.loads(config.read_text()))
        assert any(where.startswith("data.") for where, _ in found)          # the training data's metadata is read
        absolute = [(where, s) for where, s in found if ABSOLUTE.match(s)]
        assert not absolute, f"{config.parent.name}/config.json names absolute paths: {absolute}"

def test_the_check_finds_an_absolute_path():
    "Negative control: the paths the EAGLE head's config held before."
    config = {"data": {"parts": [{"excluded_evaluation_sets": ["builtin", "/work/shared/prompts/spec_bench_dev.jsonl"]}]},
              "metrics": {"init_head": {"path": "/work/bench/specdec/assets/heads/smollm2-135m-eagle"}}}
    assert [w for w, s in strings(config) if ABSOLUTE.match(s)] == ["data.parts[0].excluded_evaluation_sets[1]",
                                                                    "metrics.init_head.path"]

def test_the_shipped_heads_load_for_their_target():
    from specdec.models import load_model
    from specdec.heads import shipped_head
    target = load_model("smollm2-135m", device="cpu")
    for kind in ("eagle", "medusa"):
        assert shipped_head(target, kind).config["data"]["parts"]
