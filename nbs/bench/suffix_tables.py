"""A benchmark run's acceptance by match length, by source and by estimated probability, for each method whose
drafter keeps counters (SuffixDecoding): the first iteration's speed records (at temperature 0 every iteration of a
prompt drafts alike), merged over prompts, per category with --per-category.
Usage: python nbs/bench/suffix_tables.py RUN_DIR [--per-category]"""
import argparse, collections
from pathlib import Path
from specdec.provenance import read_records
from specdec.suffix import acceptance_tables

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("run_dir")
ap.add_argument("--per-category", action="store_true")
args = ap.parse_args()
kept = collections.defaultdict(list)                    # (method, drafter, category) -> counters
for r in read_records(Path(args.run_dir) / "records.jsonl"):
    if r.get("purpose") == "speed" and r["iteration"] == 0:
        for drafter, counters in r.get("drafter_counters", {}).items():
            kept[(r["method"], drafter, r["category"] if args.per_category else "all")].append(counters)
if not kept: raise SystemExit(f"{args.run_dir}: no record keeps drafter counters (no suffix method in this run?)")
for (method, drafter, category), counters in sorted(kept.items()):
    print(f"{method} ({drafter}), {category}: {len(counters)} generations")
    for table, rows in acceptance_tables(counters).items():
        if not rows: continue
        print(f"  {table}: " + " | ".join(rows[0]))
        for row in rows: print("    " + " | ".join(str(v) for v in row.values()))
