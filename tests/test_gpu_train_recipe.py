"""`nbs/bench/gpu_session.sh train`, issue 32's recipe for a lent GPU, run here as its dry run on the tiny model (the
script's own flags, a few overridden to fit a test): an EAGLE-3 head trained fresh on answers the target writes to
ShareGPT first user turns and on whole conversations it scores, from a carried subset (`write_sharegpt_subset`); the
checkpoint comes back with its report and drafts losslessly. The subset here is a tiny synthetic file."""
import json, os, subprocess, sys
from pathlib import Path
import torch
from specdec import generate
from specdec.conversations import write_sharegpt_subset
from specdec.prompts import load_prompts
from specdec.specs import make_drafter
from specdec.controllers import FixedK
from test_conversations import cut_file

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_train_recipe_trains_an_eagle3_head_on_carried_conversations(tiny, tmp_path):
    subset = tmp_path / "sharegpt.json.gz"
    write_sharegpt_subset(subset, 100, 1 << 20, source=cut_file(tmp_path / "cut.json"))
    small = {"conversations": subset, "text_records": 4, "n_batches": 2, "batch_size": 4, "max_new_tokens": 8,
             "train_max_seconds": 5, "epochs": 1, "tau_new_tokens": 4, "draft_vocab_size": 64,
             "data_dir": tmp_path / "data", "text_max_tokens": 40, "max_len": 64}
    flags = [w for name, value in small.items() for w in ("-p", name, str(value))]
    env = dict(os.environ, OUT=str(tmp_path / "out"), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    done = subprocess.run(["bash", str(ROOT / "nbs/bench/gpu_session.sh"), "train", "tiny-llama", "cpu", *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "training:" in (tmp_path / "out" / "table.txt").read_text()
    report = json.loads((tmp_path / "out" / "head" / "eagle3" / "report.json").read_text())
    answers, text = report["data"]["parts"]                      # answers to first user turns, then scored conversations
    assert answers["prompt_sources"]["sharegpt"]["provenance"]["subset"]["kept"] == 13
    assert answers["records_by_style"] == {"sharegpt": answers["records"]} and answers["records"] == 8
    assert text["prompt_sources"]["sharegpt_text"]["settings"]["n_records"] == 4 and text["records"] == 4
    metrics = report["metrics"]
    assert metrics["ttt_steps"] == 7 and metrics["steps"] >= 1 and set(metrics["tau_heldout"]["by_k"]) == {"4"}
    head = make_drafter(f"eagle3:{report['checkpoint']}", tiny)
    assert head.head_type == "eagle3" and len(head.draft_vocab) <= 64
    prompt = load_prompts("builtin")[0].encode(tiny)
    plain = generate(tiny, prompt, max_new_tokens=12, eos_token_id=[])
    drafted = generate(tiny, prompt, drafter=head, controller=FixedK(4), max_new_tokens=12, eos_token_id=[])
    assert torch.equal(drafted.tokens, plain.tokens)
