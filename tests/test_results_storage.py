"""How runs are kept in `results/`: a committed run holds MANIFEST.json, its records compressed (`records.jsonl.gz`)
and its executed notebook (`report.ipynb`, or an older run's `report.ipynb.gz`); HTML and plotly.js are rendered on
demand, never committed. Compressing is lossless (the same records, the same summary), a running run is refused, and
a compressed notebook renders as the plain one does. The READMEs' links into `results/` name files that exist."""
import gzip, json, re, shutil, subprocess
from pathlib import Path
import pytest
from specdec.bench import read_records
from specdec.report import compress_run, render_reports, text_summary
from specdec.provenance import read_manifest, find_run, holds_run

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "results" / "example-synthetic"

def tracked(under:str="") -> set[str]:
    out = subprocess.run(["git", "ls-files", "-z", *([under] if under else [])], cwd=ROOT, capture_output=True,
                         check=True).stdout
    return {f for f in out.decode().split("\0") if f}

def test_committed_runs_are_compressed_and_hold_no_rendering():
    files = tracked("results")
    runs = {str(Path(f).parent) for f in files if f.endswith(("/MANIFEST.json", "/MANIFEST.json.gz"))}
    assert len(runs) >= 20
    for run in runs:
        assert f"{run}/records.jsonl.gz" in files and f"{run}/records.jsonl" not in files, run
        assert {f"{run}/report.ipynb", f"{run}/report.ipynb.gz"} & files, f"{run} has no executed notebook"
    rendered = sorted(f for f in files if f.endswith((".html", ".js")))
    assert not rendered, f"rendered copies are made on demand, not committed: {rendered}"

def test_readme_links_into_results_name_tracked_files():
    files = tracked()
    for readme, base in (("README.md", ""), ("results/README.md", "results/")):
        links = re.findall(r"\]\(([^)\s]+)\)", (ROOT / readme).read_text())
        targets = [base + l.split("#")[0] for l in links if (base + l).startswith("results/")]   # no anchors
        assert len(targets) >= 10, readme
        for target in targets:                                  # a file, or a folder holding tracked files
            ok = target in files if not target.endswith("/") else any(f.startswith(target) for f in files)
            assert ok, f"{readme} links to {target}, which is not in the repository"

@pytest.fixture
def plain_run(tmp_path) -> Path:
    "The committed synthetic example run, uncompressed, as `specdec bench` leaves a run: `results/example/`."
    run = tmp_path / "results" / "example"
    run.mkdir(parents=True)
    shutil.copy(EXAMPLE / "MANIFEST.json", run)
    for name in ("records.jsonl", "report.ipynb"):
        (run / name).write_bytes(gzip.decompress((EXAMPLE / f"{name}.gz").read_bytes()))
    return run

def test_compress_run_is_lossless_and_refuses_a_running_run(plain_run):
    records, notebook = (plain_run / "records.jsonl").read_bytes(), (plain_run / "report.ipynb").read_bytes()
    summary = text_summary(plain_run)
    assert compress_run(plain_run) == [plain_run / "records.jsonl.gz"]                      # the records only
    assert compress_run(plain_run, notebooks=True) == [plain_run / "report.ipynb.gz"]      # then the notebook
    assert sorted(p.name for p in plain_run.iterdir()) == ["MANIFEST.json", "records.jsonl.gz", "report.ipynb.gz"]
    assert gzip.decompress((plain_run / "records.jsonl.gz").read_bytes()) == records
    assert gzip.decompress((plain_run / "report.ipynb.gz").read_bytes()) == notebook
    assert read_records(plain_run / "records.jsonl") == [json.loads(l) for l in records.decode().splitlines()]
    assert text_summary(plain_run) == summary and "× specdec-AR" in summary
    assert compress_run(plain_run, notebooks=True) == []                                   # nothing left to compress
    manifest = read_manifest(plain_run)
    assert compress_run(plain_run, manifest=True) == [plain_run / "MANIFEST.json.gz"]      # an older run's manifest
    assert read_manifest(plain_run) == manifest and text_summary(plain_run) == summary and holds_run(plain_run)
    assert find_run("example", plain_run.parent, committed=True) == plain_run              # read, as `specdec summary`
    with pytest.raises(ValueError, match="was compressed for committing .MANIFEST.json.gz.: .* never resumed"):
        find_run("example", plain_run.parent)                                              # never resumed
    assert not holds_run(plain_run.parent / "fresh")
    (plain_run / "MANIFEST.json").write_bytes(gzip.decompress((plain_run / "MANIFEST.json.gz").read_bytes()))
    (plain_run / "MANIFEST.json.gz").unlink()                                               # plain again, as written
    (plain_run / "records.jsonl").write_bytes(records)
    with pytest.raises(ValueError, match=r"records.jsonl.gz exists already: .* was compressed before"):
        compress_run(plain_run)
    manifest = json.loads((plain_run / "MANIFEST.json").read_text())
    (plain_run / "MANIFEST.json").write_text(json.dumps({**manifest, "status": "running"}))
    with pytest.raises(ValueError, match=r"is 'running', not done: compress a run once it has finished"):
        compress_run(plain_run)
    assert (plain_run / "records.jsonl").read_bytes() == records                           # left as it was

def test_a_compressed_notebook_renders_as_the_plain_one(plain_run):
    import plotly.offline
    results = plain_run.parent
    packed = results / "packed"
    packed.mkdir()
    shutil.copy(plain_run / "MANIFEST.json", packed)
    (packed / "report.ipynb.gz").write_bytes(gzip.compress((plain_run / "report.ipynb").read_bytes()))
    plain_html, = render_reports("example", results=results)
    packed_html, = render_reports(packed)
    assert (plain_html, packed_html) == (plain_run / "report.html", packed / "report.html")
    uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"                 # nbconvert's element ids
    same = lambda p: re.sub(uuid, "ID", p.read_text())
    assert same(plain_html) == same(packed_html) and '<script src="../plotly.min.js">' in same(plain_html)
    assert (results / "plotly.min.js").read_text() == plotly.offline.get_plotlyjs()      # the installed plotly's
    with pytest.raises(ValueError, match=r"nothing to render: neither nowhere nor .*results/nowhere exists"):
        render_reports("nowhere", results=results)
    (results / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty holds no executed notebook \(.ipynb or .ipynb.gz\) to render"):
        render_reports("empty", results=results)
