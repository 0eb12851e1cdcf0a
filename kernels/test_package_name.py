import os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_folder_leaves_the_name_kernels_to_the_package_that_owns_it(tmp_path):
    """transformers (5.25 and later depend on it) imports Hugging Face's `kernels` package; with this repository's root on
    sys.path (`python -m pytest` there) the folder `kernels/` must not stand in for it, and its own modules still import."""
    other = tmp_path / "kernels"
    other.mkdir()
    (other / "__init__.py").write_text("CUDAProperties = 'the other package'\n")
    code = ("import kernels, kernels.greedy_verify, specdec_kernels; "
            "print(kernels.CUDAProperties, kernels.greedy_verify.__file__, specdec_kernels.KERNEL_NAMES[0], sep='|')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(tmp_path)},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().split("|") == ["the other package", str(ROOT / "kernels" / "greedy_verify.py"), "greedy_verify"]
