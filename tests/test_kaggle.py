"Kaggle kernel folders: metadata, the injected notebook, and push/pull through a fake `kaggle` executable."
import json, os, stat, sys
from pathlib import Path
import nbformat, pytest
from specdec.kaggle import (write_kernel, validate_metadata, kernel_metadata, kaggle_credentials, push, pull,
                            METADATA_FIELDS, MISSING_CREDENTIALS)

@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    for k in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR"): monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

@pytest.fixture
def credentials(monkeypatch, tmp_path):
    cfg = tmp_path / "kaggle-config"; cfg.mkdir()
    (cfg / "kaggle.json").write_text(json.dumps({"username": "alice", "key": "secret"}))
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False); monkeypatch.delenv("KAGGLE_KEY", raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(cfg))

@pytest.fixture
def fake_kaggle(tmp_path, monkeypatch):
    "A `kaggle` on PATH that logs its arguments; `kernels output` writes a finished run folder."
    bindir = tmp_path / "bin"; bindir.mkdir()
    log = tmp_path / "kaggle-args.jsonl"
    script = bindir / "kaggle"
    script.write_text(f"""#!{sys.executable}
import json, sys, pathlib
args = sys.argv[1:]
open({str(log)!r}, "a").write(json.dumps(args) + "\\n")
if args[:2] == ["kernels", "output"]:
    run = pathlib.Path(args[args.index("-p") + 1]) / "results" / "20990101-000000-smollm2-135m-abcd1234"
    run.mkdir(parents=True)
    (run / "MANIFEST.json").write_text('{{"run_id": "20990101-000000-smollm2-135m-abcd1234"}}')
    (run / "records.jsonl").write_text("")
    (run.parent.parent / "specdec-methods-t4.ipynb").write_text('{{"cells": [], "metadata": {{}}, "nbformat": 4, "nbformat_minor": 5}}')
print("ok from fake kaggle")
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return log

def test_folder_has_documented_metadata_and_injected_notebook(tmp_path, credentials):
    folder = write_kernel("methods", tmp_path / "k", gpu="t4", parameters={"max_new_tokens": 128})
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    for field, kind in METADATA_FIELDS.items(): assert isinstance(meta[field], kind), field
    assert meta["id"] == "alice/specdec-methods-t4" and meta["enable_gpu"] and meta["machine_shape"] == "NvidiaTeslaT4"
    nb = nbformat.read(str(folder / meta["code_file"]), as_version=4)
    assert nb.cells[0].metadata["tags"] == ["kaggle-install"]
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1
    src = injected[0].source
    assert 'device = "cuda"' in src and 'dtype = "float16"' in src and "max_new_tokens = 128" in src   # T4: fp16

def test_cpu_kernel_and_user_parameters_win(tmp_path, credentials):
    folder = write_kernel("methods", tmp_path / "k", gpu="none", parameters={"dtype": "float32", "device": "cpu"}, title="my cpu run")
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    assert meta["enable_gpu"] is False and "machine_shape" not in meta and meta["id"] == "alice/my-cpu-run"

def test_bad_inputs_name_the_problem(tmp_path, credentials, no_credentials):
    with pytest.raises(ValueError, match="unknown --gpu 'v100'"): write_kernel("methods", tmp_path, gpu="v100", username="a")
    with pytest.raises(ValueError, match="no benchmark notebook 'nope'"): write_kernel("nope", tmp_path, username="a")
    with pytest.raises(ValueError, match="needs a Kaggle username: pass --user"): write_kernel("methods", tmp_path)
    with pytest.raises(ValueError, match="without internet needs --dataset"): write_kernel("methods", tmp_path, username="a", internet=False)
    meta = kernel_metadata("a", "title five", "x.ipynb"); del meta["title"]; meta["enable_gpu"] = "true"
    with pytest.raises(ValueError, match=r"missing field 'title'.*'enable_gpu' must be bool"): validate_metadata(meta)

def test_push_and_pull_through_the_kaggle_command(tmp_path, credentials, fake_kaggle):
    folder = write_kernel("methods", tmp_path / "k", gpu="t4")
    assert "ok from fake kaggle" in push(folder)
    runs = pull("alice/specdec-methods-t4", tmp_path / "results")
    calls = [json.loads(l) for l in fake_kaggle.read_text().splitlines()]
    assert calls[0] == ["kernels", "push", "-p", str(folder)]
    assert calls[1][:3] == ["kernels", "output", "alice/specdec-methods-t4"]
    assert [r.name for r in runs] == ["20990101-000000-smollm2-135m-abcd1234"] and (runs[0] / "MANIFEST.json").exists()
    assert (runs[0] / "report.ipynb").exists()                    # the notebook as Kaggle executed it
    with pytest.raises(ValueError, match="exists already"): pull("alice/specdec-methods-t4", tmp_path / "results")

def test_push_and_pull_without_credentials_say_what_is_missing(tmp_path, credentials, fake_kaggle, monkeypatch):
    folder = write_kernel("methods", tmp_path / "k", gpu="t4")
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no Kaggle credentials: put kaggle.json"): push(folder)
    with pytest.raises(ValueError, match="no Kaggle credentials"): pull("alice/specdec-methods-t4", tmp_path / "r")
    assert not fake_kaggle.exists()   # nothing was run

def test_missing_kaggle_executable(tmp_path, credentials, monkeypatch):
    folder = write_kernel("methods", tmp_path / "k", gpu="t4")
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="pip install kaggle"): push(folder)

def test_generated_notebook_runs_under_local_papermill(tmp_path, credentials):
    "The Kaggle notebook, written for a CPU, runs to a complete run folder here (its install cell is a no-op off Kaggle)."
    import papermill as pm
    from specdec.report import validate_manifest
    out = tmp_path / "results"
    params = {"model": "tiny-llama", "drafters": "pld", "categories": "qa", "n_prompts": 1, "max_new_tokens": 8, "iterations": 1,
              "warmup": 0, "ks": "4", "cost_model": False, "bootstrap": 50, "out": str(out)}
    folder = write_kernel("methods", tmp_path / "k", gpu="none", parameters=params)
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    pm.execute_notebook(str(folder / meta["code_file"]), str(tmp_path / "executed.ipynb"), kernel_name="python3",
                        cwd=str(tmp_path), progress_bar=False)
    [run] = [p for p in out.iterdir() if p.is_dir()]
    manifest = validate_manifest(run / "MANIFEST.json")
    assert manifest["status"] == "done" and manifest["params"]["device"] == "cpu" and manifest["params"]["model"] == "tiny-llama"
    assert manifest["counts"]["records"] == len(manifest["methods"])
