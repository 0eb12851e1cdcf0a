"""A `kaggle` executable for tests: it answers the commands `specdec kaggle` runs as the official CLI does (the same
arguments and output forms: `config view`, `datasets status/create/version`, `kernels push/status/output`), logs each
call, and keeps what was uploaded in a state folder. `kernels output` copies FAKE_KAGGLE_OUTPUT (a kernel's
/kaggle/working as it ended) when set, else writes a small finished run."""
import os, stat, sys
from pathlib import Path

SCRIPT = r'''#!{python}
import json, os, shutil, sys, pathlib
state = pathlib.Path({state!r}); state.mkdir(exist_ok=True)
args = sys.argv[1:]
with open(state / "calls.jsonl", "a") as f: f.write(json.dumps(args) + "\n")
def folder(): return pathlib.Path(args[args.index("-p") + 1])
if args[:2] == ["config", "view"]:
    print("Configuration values from " + str(state)); print("- username: " + os.environ.get("FAKE_KAGGLE_USER", "None"))
elif args[:2] == ["datasets", "status"]:
    if (state / "datasets" / args[2].replace("/", "__")).exists(): print("ready")
    else: print("404 Client Error: Not Found", file=sys.stderr); sys.exit(1)
elif args[:2] in (["datasets", "create"], ["datasets", "version"]):
    meta = json.loads((folder() / "dataset-metadata.json").read_text())
    dest = state / "datasets" / meta["id"].replace("/", "__")
    if args[1] == "version" and not dest.exists(): print("404 dataset not found", file=sys.stderr); sys.exit(1)
    shutil.rmtree(dest, ignore_errors=True); shutil.copytree(folder(), dest)
    print("Dataset version is being created.")
elif args[:2] == ["kernels", "push"]:
    meta = json.loads((folder() / "kernel-metadata.json").read_text())
    for d in meta["dataset_sources"]:
        if not (state / "datasets" / d.replace("/", "__")).exists(): print(f"dataset {{d}} not found", file=sys.stderr); sys.exit(1)
    dest = state / "kernels" / meta["id"].replace("/", "__")
    shutil.rmtree(dest, ignore_errors=True); shutil.copytree(folder(), dest)
    print(f"Kernel version 1 successfully pushed.  Please check progress at https://www.kaggle.com/code/{{meta['id']}}")
elif args[:2] == ["kernels", "status"]:
    print(f'{{args[2]}} has status "KernelWorkerStatus.{{os.environ.get("FAKE_KAGGLE_STATUS", "COMPLETE")}}"')
elif args[:2] == ["kernels", "output"]:
    out = folder()
    if os.environ.get("FAKE_KAGGLE_OUTPUT"): shutil.copytree(os.environ["FAKE_KAGGLE_OUTPUT"], out, dirs_exist_ok=True)
    else:
        run = out / "results" / "20990101-000000-smollm2-135m-abcd1234"; run.mkdir(parents=True)
        (run / "MANIFEST.json").write_text('{{"run_id": "20990101-000000-smollm2-135m-abcd1234"}}')
        (run / "records.jsonl").write_text("")
        (out / "__notebook__.ipynb").write_text('{{"cells": [], "metadata": {{}}, "nbformat": 4, "nbformat_minor": 5}}')
    print("Output file downloaded to " + str(out))
else: print("fake kaggle: unknown command " + " ".join(args), file=sys.stderr); sys.exit(2)
'''


def install_fake_kaggle(bindir:Path, state:Path) -> Path:
    "Write the fake `kaggle` into `bindir`; calls are logged to `state/calls.jsonl`."
    bindir.mkdir(parents=True, exist_ok=True)
    script = bindir / "kaggle"
    script.write_text(SCRIPT.format(python=sys.executable, state=str(state)))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def calls(state:Path) -> list[list[str]]:
    import json
    path = state / "calls.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
