"""The explorer in a real JupyterLab, driven by headless Chromium (.ci/screenshot_explorer.py --check): every control
inside its column and the column inside the output area, a long error wrapped without moving it, and JupyterLab's
save of nbs/explore.ipynb without outputs. A development check: it needs `bash .ci/dev-setup` (Chromium, playwright)
and is skipped, saying so, where they are absent (as in CI)."""
import shutil, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_explorer_layout_in_a_real_jupyterlab():
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("no Chromium here: `bash .ci/dev-setup` installs it (the layout check runs where it is)")
    pytest.importorskip("playwright", reason="no playwright here: `bash .ci/dev-setup` installs it")
    proc = subprocess.run([sys.executable, str(ROOT / ".ci" / "screenshot_explorer.py"), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and '"layout_problems": 0' in proc.stdout, proc.stdout + proc.stderr
