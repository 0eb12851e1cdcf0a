"""Open nbs/explore.ipynb in a real JupyterLab, run it in headless Chromium, click the explorer's Run button and save
a screenshot (default nbs/images/explorer.png). Needs: jupyterlab, ipywidgets, anywidget, playwright (Python package)
and a Chromium (`apt-get install chromium`). Usage: .venv/bin/python .ci/screenshot_explorer.py [OUT.png]"""
import os, secrets, shutil, socket, subprocess, sys, time, urllib.request
from pathlib import Path

root = Path(__file__).resolve().parent.parent
out = Path(sys.argv[1] if len(sys.argv) > 1 else root / "nbs" / "images" / "explorer.png")
chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
if not chromium: sys.exit("no Chromium found: apt-get install chromium")
with socket.socket() as s: s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
token = secrets.token_hex(16)
lab = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                        f"--IdentityProvider.token={token}", "--ServerApp.root_dir=" + str(root), "--allow-root"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    for _ in range(120):
        try: urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2); break
        except OSError: time.sleep(1)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.goto(f"http://127.0.0.1:{port}/lab/tree/nbs/explore.ipynb?token={token}")
        page.wait_for_selector(".jp-Notebook", timeout=120_000)
        page.wait_for_timeout(3000)
        select = page.get_by_role("button", name="Select", exact=True)
        if select.count(): select.click()                       # JupyterLab asks which kernel on a first open
        news = page.get_by_role("button", name="No", exact=True)
        if news.count(): news.first.click()                     # "get notified about Jupyter news?"
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_text("Run All Cells", exact=True).click()
        button = page.locator(".widget-button", has_text="Run").first
        try: button.wait_for(timeout=300_000)
        except Exception:
            page.screenshot(path=str(out.with_suffix(".debug.png"))); raise
        page.wait_for_timeout(2000)
        button.click()
        page.wait_for_selector(".sd-badge", timeout=600_000)
        page.wait_for_timeout(2000)
        out.parent.mkdir(parents=True, exist_ok=True)
        page.locator(".jp-OutputArea-output").filter(has=page.locator(".sd-tokens")).first.screenshot(path=str(out))
        print(out)
        browser.close()
finally:
    lab.terminate(); lab.wait(30)
