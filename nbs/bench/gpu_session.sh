#!/usr/bin/env bash
# One lent-GPU session (15 min of device time in all, a machine's start included) in two `run` calls, straight after one
# another (the machine goes back 30 s after a call: call 2 on a fresh machine finds neither the packages nor part 1, and
# stops at once saying so). Prepare here first: `bash nbs/bench/gpu_session.sh prepare` (wheels, the SmolLM2 GGUF in two parts, and the
# Spec-Bench dev prompts beside the second part: ../shared does not travel).
#   call 1, carry [".device/wheels", ".device/w1"]:  bash nbs/bench/gpu_session.sh checks   (timeout_s 240; ~3 min)
#                                                or: bash nbs/bench/gpu_session.sh setup    (install only; ~30 s)
#   call 2, carry [".device/w2"]:                     bash nbs/bench/gpu_session.sh bench    (timeout_s 560; ~8 min)
#                                                or: bash nbs/bench/gpu_session.sh train    (timeout_s 560; ~8 min)
# bench: every Spec-Bench dev category (one prompt each), 128 new tokens, 2 interleaved iterations, a float32
# certificate on 2 prompts; chains at K=4 and the EAGLE head drafting EAGLE-2's 60-node tree of depth 6 (verifying 61
# tokens costs a GPU about what 1 does; τ 2.23 against the chain's 1.56 on this CPU, 13 prompts).
# HF eager and HF prompt lookup (~4.5 s a generation there) are most of its time. hf-static's
# cache has one size for the run, so HF compiles once (~40 s). A bench cut off by its time limit keeps its records,
# and the table (`specdec summary`) is then made from them and says so.
# train: continues the shipped EAGLE head on self-distilled data the float32 target writes there (time budgets: 150 s
# of data, 150 s of training), measures tau on 4 held-out built-in prompts; the checkpoint comes back in $OUT/head/eagle
# (benchmark it on the CPU before shipping it).
# Results go under $OUT; the last lines printed are a short table. A dry run here: `bash nbs/bench/gpu_session.sh bench
# MODEL DEVICE [more bench flags]` (e.g. `smollm2-135m cpu --max-new-tokens 8`, with the venv's python3 first on PATH; the
# heads ship for SmolLM2 only), `... train MODEL DEVICE [-p NAME VALUE ...]`.
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PROMPTS=builtin                                                   # Spec-Bench dev where it travelled (or is here)
for f in .device/w2/spec_bench_dev.jsonl shared/prompts/spec_bench_dev.jsonl ../shared/prompts/spec_bench_dev.jsonl; do
  [ -f "$f" ] && PROMPTS=$f && break
done
GGUF=/tmp/sd/SmolLM2-135M-Instruct.Q4_1.gguf
install() {
  mkdir -p /tmp/sd && cp .device/w1/part1 /tmp/sd/
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/wheels/*.whl
  ln -sfn "$PWD/kernels" /tmp/site/specdec_kernels                # the package pyproject installs from kernels/
}
model_here() {                                                    # call 2: what call 1 left on this machine
  [ -d /tmp/site/papermill ] && [ -s /tmp/sd/part1 ] || {
    echo "call 2 found a fresh machine (no /tmp/site packages or /tmp/sd/part1): run checks or setup first, then this at once" >&2
    exit 3; }
  cat /tmp/sd/part1 .device/w2/part2 > "$GGUF" || exit 3
}
case "${1:-}" in
prepare)
  bash ../shared/device/prepare.sh fastcore plotly jsonschema
  cp ../shared/prompts/spec_bench_dev.jsonl .device/w2/
  ;;
setup) install ;;
checks)
  install
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
  # one line per test as it ends, all kept in checks.txt (a run cut off by its timeout still says what passed); the CPU
  # emulations of graph buffers (GraphBuffers) are left to the CPU: they would spend the 150 s before the CUDA tests
  timeout 150 python3 -m pytest -v -rfE -p no:cacheprovider kernels/ tests/test_engine.py \
      tests/test_heads.py tests/test_trees.py -k "(cuda or triton or registry or fused or step) and not (read_each_step or eagle2_sized or graph_buffers)" 2>&1 | tee "$OUT/checks.txt" | tail -25
  python3 - <<'PY' 2>&1 | tee "$OUT/launches.txt"
# CUDA kernels one forward_at step launches (torch profiler), per step-op choice, on a random SmolLM2-sized model
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from specdec.net import DecoderNet
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, tie_word_embeddings=True, attn_implementation="sdpa")
model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
for kernels in ("torch", "triton"):
    net = DecoderNet(model, kernels=kernels)
    for q in (1, 5):
        cache = net.new_cache(1, 512)
        ids, pos = torch.zeros(1, q, dtype=torch.long, device="cuda"), torch.arange(300, 300 + q, device="cuda")
        with torch.inference_mode():
            for _ in range(3): net.forward_at(ids, pos, cache)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                net.forward_at(ids, pos, cache); torch.cuda.synchronize()
        n = sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
        print(f"kernels={kernels} q={q}: {n} CUDA kernels per step")
PY
  python3 - <<'PY' 2>&1 | tee "$OUT/head_steps.txt"
# an EAGLE head's draft cost, its forwards eager against HeadSteps graphs, on a random SmolLM2-shaped target (bf16)
import torch
from specdec import generate
from specdec.models import tiny_llama
from specdec.train import new_head
from specdec.controllers import FixedK
target = tiny_llama(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536,
                    device="cuda", dtype=torch.bfloat16)
head = new_head("eagle", target).to(torch.bfloat16)
prompt = torch.randint(0, 49152, (1, 300), device="cuda")
eager_head = lambda compile: (setattr(head, "steps", None), {"mode": "eager"})[1]   # the head eager, the target as graphs
for run in ("ar", "head eager", "head graphs") * 2:
    if run == "head eager": head.use_engine = eager_head
    elif run == "head graphs": del head.use_engine
    out = generate(target, prompt, drafter=None if run == "ar" else head, controller=None if run == "ar" else FixedK(4),
                   max_new_tokens=64, eos_token_id=[], compile="graphs")
    s = out.stats
    print(f"{run:12s}: {s.wall_time:.3f} s for {s.new_tokens} tokens, {s.target_forwards} target steps, "
          f"{s.draft_forwards} head forwards, {s.accepted} accepted; mode {out.engine.get('drafter', {}).get('mode')}")
PY
  ;;
bench)
  model=${2:-$GGUF}; device=${3:-cuda}; shift $(( $# < 3 ? $# : 3 ))
  [ "$model" = "$GGUF" ] && model_here
  timeout 480 python3 -m specdec.cli bench --model "$model" --device "$device" --max-new-tokens 128 --prompts "$PROMPTS" \
      --n-prompts 1 --iterations 2 --certify-prompts 2 --no-cost-model --drafters "pld,eagle,eagle-tree:10:60@6,medusa,pld:3:2+eagle" \
      --ks 4 --out "$OUT" --no-html "$@" 2>&1 | tail -40
  for run in "$OUT"/*/; do                                        # a run cut off by its limit says PARTIAL RUN
    [ -f "$run/MANIFEST.json" ] && python3 -m specdec.cli summary "$run" | tee "$OUT/table.txt"
  done
  ;;
train)
  model=${2:-$GGUF}; device=${3:-cuda}; shift $(( $# < 3 ? $# : 3 ))
  [ "$model" = "$GGUF" ] && model_here
  timeout 520 python3 -m papermill nbs/bench/train_head.ipynb "$OUT/train_head.ipynb" -k python3 --no-progress-bar \
      -p target "$model" -p device "$device" -p dtype float32 -p head_type eagle \
      -p init_head specdec/assets/heads/smollm2-135m-eagle -p n_batches 32 -p batch_size 512 -p max_new_tokens 128 \
      -p data_max_seconds 150 -p epochs 4 -p lr 0.001 -p train_batch 16 -p ttt_steps 3 -p train_max_seconds 150 \
      -p out_dir "$OUT/head" -p data_dir /tmp/sd/data -p exclude "$PROMPTS" -p tau_prompts 4 -r tau_ks 3 \
      -p draft_cost_iterations 0 "$@" 2>&1 | tail -30
  python3 - "$OUT/head/eagle/report.json" <<'PY' | tee "$OUT/table.txt"
import json, sys
r = json.load(open(sys.argv[1])); m, d = r["metrics"], r["data"]
print("data:", d["records"], "records,", d["answer_tokens"], "answer tokens; batches done",
      [p.get("batches_done") for p in d.get("parts", [d])], "| stopped:", [p.get("stopped") for p in d.get("parts", [d])])
print("training:", m["steps"], "of", m["planned_steps"], "steps,", m["seconds"], "s on", m["device"], "| stopped:", m["stopped"])
print("tau on held-out built-in prompts (K, tau, accepted by position):",
      [(k, round(t["tau"], 3), [round(a, 3) for a in t["accepted_by_position"]]) for k, t in m["tau_heldout"]["by_k"].items()])
PY
  ;;
*) echo "usage: $0 prepare|setup|checks|bench|train" >&2; exit 2 ;;
esac
