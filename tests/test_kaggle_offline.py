"""The kernel `specdec kaggle methods --gpu none` writes, run as Kaggle runs it: in a fresh environment holding only what
Kaggle's image lists (`specdec.kaggle.KAGGLE_IMAGE`), with the kernel's wheels dataset mounted under a stand-in for
/kaggle/input and no specdec installed until the kernel's first cell installs it from there (no index); then the run
pulled back through a fake `kaggle` and rendered. Needs PyPI (for the environment and the wheels), as `.ci/setup` does."""
import json, os, shutil, subprocess, sys
from pathlib import Path
import nbformat, pytest
from specdec import kaggle as K
from specdec.cli import main
from specdec.report import validate_manifest
from fake_kaggle import install_fake_kaggle

TINY = {"model": "smollm2-135m", "drafters": "pld", "ks": "4", "categories": "qa", "n_prompts": 1, "max_new_tokens": 4,
        "iterations": 1, "warmup": 0, "hf_pld": False, "cost_model": False, "perplexity": False, "bootstrap": 50,
        "certify_prompts": 1}
# The heavy packages at the versions CI tests (the pip cache holds them); the rest as Kaggle's build states them (newest).
PINNED_HERE = ("torch", "numpy", "scipy", "pandas", "transformers", "tokenizers", "safetensors", "accelerate")


def image_requirements() -> list[str]:
    pins = {**K.tested_pins(K.source_root()), "torch": "2.13.0"}
    return [f"{n}=={pins[n]}" if n in PINNED_HERE else f"{n}{spec}" for n, spec in K.KAGGLE_IMAGE.items()]


def run(args, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, args[:4]))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def test_kernel_runs_offline_from_its_wheels_on_the_image_alone(tmp_path, monkeypatch):
    folder = K.write_kernel("methods", tmp_path / "k", gpu="none", parameters=TINY, username="ci")
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    kaggle = tmp_path / "kaggle"                                     # stands in for /kaggle
    shutil.copytree(folder / "wheels", kaggle / "input" / "specdec-wheels")
    (kaggle / "working").mkdir(parents=True)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "JUPYTER_PATH")}
    image = tmp_path / "image"
    run([sys.executable, "-m", "venv", str(image)])
    python = str(image / "bin" / "python")
    run([python, "-m", "pip", "install", "-q", "--no-compile", *image_requirements()], env=env)   # .pyc on first import
    run([python, "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"], env=env)
    print(run([python, "-m", "pip", "list"], env=env).stdout)                  # the versions, in the log of a failure
    env.update(PATH=f"{image / 'bin'}{os.pathsep}{env['PATH']}", JUPYTER_PATH=str(image / "share" / "jupyter"),
               HF_HUB_OFFLINE="1")
    missing = subprocess.run([python, "-c", "import specdec"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert missing.returncode != 0                                   # only the kernel's first cell installs it

    code = folder / meta["code_file"]
    nb = nbformat.read(str(code), as_version=4)
    assert nb.cells[0].source.count('kaggle="/kaggle"') == 1
    nb.cells[0].source = nb.cells[0].source.replace('kaggle="/kaggle"', f"kaggle={str(kaggle)!r}")
    nbformat.write(nb, str(tmp_path / "kernel.ipynb"))
    executed = kaggle / "working" / "__notebook__.ipynb"
    run([python, "-m", "papermill", str(tmp_path / "kernel.ipynb"), str(executed), "-k", "python3",
         "--cwd", str(kaggle / "working"), "--no-progress-bar"], env=env, cwd=kaggle / "working", timeout=1200)
    where = run([python, "-c", "import specdec; print(specdec.__file__)"], cwd=tmp_path, env=env).stdout
    assert where.startswith(str(image))                              # the wheel from the dataset, not this checkout

    [run_dir] = (kaggle / "working" / "results").iterdir()
    manifest = validate_manifest(run_dir / "MANIFEST.json")
    assert manifest["status"] == "done" and manifest["params"]["device"] == "cpu" and manifest["params"]["max_new_tokens"] == 4
    records = (run_dir / "records.jsonl").read_text().splitlines()
    assert len(records) == manifest["counts"]["records"] == len(manifest["methods"]) > 0

    install_fake_kaggle(tmp_path / "bin", tmp_path / "kaggle-state")  # the user's side: pull it back and render it
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("KAGGLE_API_TOKEN", "KGAT_ci"); monkeypatch.setenv("FAKE_KAGGLE_OUTPUT", str(kaggle / "working"))
    assert main(["kaggle", "--pull", meta["id"], "--results", str(tmp_path / "results")]) == 0
    pulled = tmp_path / "results" / run_dir.name
    assert (pulled / "MANIFEST.json").exists() and (pulled / "report.ipynb").exists()
    report = (pulled / "report.html").read_text()
    assert manifest["methods"] and all(m in report for m in manifest["methods"])
