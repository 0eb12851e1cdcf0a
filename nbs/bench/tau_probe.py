"""τ of drafters on a prompt set, no timing: greedy, float32, each drafter's tokens checked against specdec-AR's.
τ (tokens per target forward) does not depend on the machine, so this CPU can say what a tree keeps that a GPU would
verify for free. Usage: python nbs/bench/tau_probe.py PER_CATEGORY "SPEC@K,SPEC@K,..." [PROMPTS] [MAX_NEW_TOKENS] [VOCAB]
e.g. python nbs/bench/tau_probe.py 1 "eagle@4,eagle-tree:10:60@6" ../shared/prompts/spec_bench_dev.jsonl 128
VOCAB (trained heads only): `draft` (default: the head's reduced draft vocabulary), `prompt` (plus each prompt's tokens
it lacks) or `full` (the target's whole vocabulary), to see what the reduced vocabulary costs in τ.
A drafter that learns across generations (suffix) sees the prompts in order, its cache warm from the earlier responses;
for one that keeps `counters`, its acceptance by match length, by source and by estimated probability is printed."""
import sys, time, collections, torch
from specdec import load_model, generate
from specdec.specs import make_drafter, make_controller, parse_method_entry
from specdec.prompts import load_prompts
from specdec.vocab import DraftVocab
from specdec.suffix import acceptance_tables

per_category, configs = int(sys.argv[1]), sys.argv[2].split(",")
prompts_path = sys.argv[3] if len(sys.argv) > 3 else "builtin"
max_new_tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 128
vocab = sys.argv[5] if len(sys.argv) > 5 else "draft"
if vocab not in ("draft", "prompt", "full"): raise SystemExit(f"VOCAB must be draft, prompt or full, got {vocab!r}")
target = load_model("smollm2-135m", dtype="float32")
chosen = load_prompts(prompts_path, n_prompts=per_category)
encoded = [p.encode(target) for p in chosen]
plain = [generate(target, ids, max_new_tokens=max_new_tokens).tokens for ids in encoded]        # specdec-AR, the reference
print(f"{len(chosen)} prompts from {prompts_path}, {max_new_tokens} new tokens, {vocab} vocabulary")
for config in configs:
    entry = parse_method_entry(config)                                          # the benchmark's SPEC@K
    if entry.controller is None: raise SystemExit(f"{config!r}: write each drafter as SPEC@K")
    drafter, t0 = make_drafter(entry.drafter, target), time.perf_counter()
    head = getattr(drafter, "head", drafter)                                    # a token tree's head, or the drafter
    if vocab != "draft" and not hasattr(head, "draft_vocab"): raise SystemExit(f"{config!r}: VOCAB {vocab} is for trained heads")
    if vocab == "prompt": head.prompt_vocab = True
    if vocab == "full": head.draft_vocab = DraftVocab.full(target.vocab_size)
    same, stats, counters = 0, None, collections.defaultdict(list)
    by_category = collections.defaultdict(lambda: [0, 0])
    for p, ids, ref in zip(chosen, encoded, plain):
        controller = make_controller(entry.controller.spec)
        out = generate(target, ids, drafter=drafter, controller=controller, max_new_tokens=max_new_tokens)
        same += torch.equal(out.tokens, ref)
        stats = out.stats if stats is None else stats + out.stats
        by_category[p.category][0] += out.tokens.shape[1]; by_category[p.category][1] += out.stats.target_forwards
        for member in drafter.members:
            if member.counters is not None: counters[member.name].append(member.counters)
    print(f"{config:32s} τ {stats.new_tokens / stats.target_forwards:.3f}  identical to AR {same}/{len(chosen)}  "
          f"proposed/step {stats.proposed / stats.target_forwards:.2f}  {time.perf_counter() - t0:.0f} s  "
          + " ".join(f"{c} {a / b:.2f}" for c, (a, b) in sorted(by_category.items()))
          + "\n    accepted / proposed by draft position: " + " / ".join(f"{a:.3f}" for a in stats.per_position_acceptance), flush=True)
    for name, kept in counters.items():
        for table, rows in acceptance_tables(kept).items():
            print(f"    {name} {table}: " + "; ".join(" ".join(f"{v}" for v in r.values()) for r in rows), flush=True)
