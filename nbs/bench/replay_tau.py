"""τ of model-free drafters (prompt lookup, suffix) replayed on specdec-AR's greedy outputs, without the target.

At temperature 0 a lossless method emits exactly the target's greedy output, and a step keeps the drafts that equal it
(a tree: its deepest branch that does), so τ, the drafts proposed and the drafter's counters follow from the output
alone: the replay runs the drafter as `generate` would (same K clipping, EOS and `finish`), in seconds instead of
hours. Outputs come from a run folder's specdec-ar records (`--from-run`), from a JSON file of earlier replays
(`--outputs`), or are generated now (and added to that file). A drafter that learns across generations sees the
prompts in order, its cache warm from the earlier outputs (the benchmark's `history=sequence`).
e.g. python nbs/bench/replay_tau.py --prompts ../shared/prompts/spec_bench_dev.jsonl --per-category 2 \\
       --from-run results/20261204-225406-smollm2-135m-0ae8217d --drafters "pld@3,suffix@3,suffix-tree:8@3"
"""
import argparse, collections, json
from pathlib import Path
import torch
from specdec import load_model, generate
from specdec.drafters import no_draft
from specdec.policies import greedy_branch
from specdec.prompts import load_prompts
from specdec.provenance import read_records
from specdec.specs import make_drafter, parse_method_entry
from specdec.suffix import acceptance_tables


def run_outputs(run_dir:Path) -> dict:
    "specdec-ar's output per prompt id in a run folder (speed records, first iteration)."
    return {r["prompt_id"]: r["tokens"] for r in read_records(Path(run_dir) / "records.jsonl")
            if r["method"] == "specdec-ar" and r["purpose"] == "speed" and r["iteration"] == 0}


def replay(drafter, prompt:list, output:list, k_max:int, max_new:int, eos:set) -> tuple[int, int, int]:
    "One generation replayed: (target forwards, drafts proposed, drafts accepted) for `output` after `prompt`."
    seq = torch.tensor([prompt + output])                                       # [1, S + n]
    S, n = len(prompt), len(output)
    drafter.start(None, seq[:, :S], S + max_new + drafter.max_drafts(k_max) + 1)
    length, steps, proposed, accepted = S, 0, 0, 0
    while length - S < max_new:
        k = min(k_max, max_new - (length - S) - 1)
        draft = drafter.propose(seq[:, :length], k) if k > 0 else no_draft(seq)
        truth = seq[0, length:].tolist()                                        # the target's tokens from here
        drafted = draft.tokens[0].tolist()
        if draft.parents is None:
            kept = next((i for i, (d, t) in enumerate(zip(drafted, truth)) if d != t), min(len(drafted), len(truth)))
            proposed += len(drafted)
        else:
            parents = list(draft.parents)
            branch = greedy_branch(parents, drafted, [truth[_depth(parents, i)] if _on_path(parents, drafted, truth, i)
                                                      else -1 for i in range(-1, len(drafted))])
            kept = len(branch)
            proposed += max(_depth(parents, i) for i in range(len(drafted))) if drafted else 0
        eos_at = next((i for i, t in enumerate(truth[:kept + 1]) if t in eos), kept + 1)   # an EOS among the emitted
        drafter.observe(min(kept, eos_at))
        steps += 1; accepted += min(kept, eos_at); length += min(kept, eos_at) + 1
        if eos_at <= kept or length - S >= n: break
    drafter.finish([seq[0, S:S + n]])
    return steps, proposed, accepted


def _depth(parents:list, i:int) -> int:
    "Tokens from the current one to node i (-1: the current token, depth 0)."
    d = 0
    while i >= 0: d, i = d + 1, parents[i]
    return d

def _on_path(parents:list, drafted:list, truth:list, i:int) -> bool:
    "Whether node i's branch is the target's own continuation (only there is the target's next token known)."
    path = []
    while i >= 0: path.append(drafted[i]); i = parents[i]
    return path[::-1] == truth[:len(path)] and len(path) < len(truth)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", default="../shared/prompts/spec_bench_dev.jsonl")
    ap.add_argument("--per-category", type=int, default=2)
    ap.add_argument("--categories", default="")
    ap.add_argument("--drafters", required=True, help="SPEC@K,... (every drafter pinned to its K)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--from-run", action="append", default=[], help="run folders whose specdec-ar outputs to use")
    ap.add_argument("--outputs", default="", help="a JSON file of specdec-AR outputs by prompt id, read and extended")
    ap.add_argument("--tables", action="store_true", help="print the suffix drafters' acceptance tables")
    args = ap.parse_args()
    target = load_model("smollm2-135m", dtype="float32")
    chosen = load_prompts(args.prompts, categories=args.categories or None, n_prompts=args.per_category)
    outputs = json.loads(Path(args.outputs).read_text()) if args.outputs and Path(args.outputs).exists() else {}
    for run in args.from_run: outputs.update(run_outputs(Path(run)))
    encoded = {p.id: p.encode(target)[0].tolist() for p in chosen}
    for p in chosen:
        if p.id not in outputs:                                                  # specdec-AR, the reference
            outputs[p.id] = generate(target, torch.tensor([encoded[p.id]]), max_new_tokens=args.max_new_tokens).tokens[0].tolist()
            if args.outputs: Path(args.outputs).write_text(json.dumps(outputs))
    eos = set(target.eos_token_ids)
    print(f"{len(chosen)} prompts from {args.prompts}, {args.max_new_tokens} new tokens, replayed on specdec-AR's outputs")
    for config in args.drafters.split(","):
        entry = parse_method_entry(config)
        if entry.controller is None or entry.controller.kind != "fixed": raise SystemExit(f"{config!r}: write SPEC@K")
        drafter, totals = make_drafter(entry.drafter, target), collections.defaultdict(lambda: [0, 0, 0, 0])
        counters = []
        for p in chosen:
            steps, proposed, accepted = replay(drafter, encoded[p.id], outputs[p.id], entry.controller.k_max,
                                               args.max_new_tokens, eos)
            for key in (p.category, "all"):
                t = totals[key]; t[0] += len(outputs[p.id]); t[1] += steps; t[2] += proposed; t[3] += accepted
            counters += [m.counters for m in drafter.members if m.counters is not None]
        n, steps, proposed, accepted = totals.pop("all")
        print(f"{config:40s} τ {n / steps:.3f}  proposed/step {proposed / steps:.2f}  accepted/proposed "
              f"{accepted / max(proposed, 1):.3f}  " + " ".join(f"{c} {t[0] / t[1]:.2f}" for c, t in sorted(totals.items())),
              flush=True)
        if args.tables and counters:
            for table, rows in acceptance_tables(counters).items():
                print(f"    {table}: " + "; ".join(" ".join(str(v) for v in r.values()) for r in rows))


if __name__ == "__main__":
    main()
