"""Open nbs/explore.ipynb in a real JupyterLab driven by headless Chromium, run it, press the explorer's Run, check the
layout and save a screenshot (default nbs/images/explorer.png).

The layout check, in the page as JupyterLab renders it: every control lies inside the controls column and the column
inside the output area (nothing cut off), no box scrolls sideways, and a long error message wraps inside the column
without moving it. Then it saves the notebook from JupyterLab and checks that the tracked file got no outputs (the
pre-save hook of .ci/jupyter_server_config.py); the file is put back as it was in any case. It prints each problem and
exits 1 if there is any.

Needs `bash .ci/dev-setup` (Debian's chromium and the playwright package). Usage:
  .venv/bin/python .ci/screenshot_explorer.py [OUT.png]     the screenshot and the check
  .venv/bin/python .ci/screenshot_explorer.py --check       the check alone (tests/test_explore_layout.py)"""
import json, os, secrets, shutil, socket, subprocess, sys, tempfile, time, urllib.request
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]

# Run in the page: the problems of the explorer's layout, as sentences (empty: none).
MEASURE = """() => {
  const px = v => Math.round(v);
  const col = document.querySelector('.sd-controls');
  if (!col) return ['no explorer on the page (.sd-controls)'];
  const box = col.getBoundingClientRect(), problems = [];
  const area = col.closest('.jp-OutputArea-output').getBoundingClientRect();
  if (box.left < area.left - 1 || box.right > area.right + 1)
    problems.push(`the controls column (${px(box.left)}-${px(box.right)}) is cut off by the output area (${px(area.left)}-${px(area.right)})`);
  if (col.scrollWidth > col.clientWidth + 1) problems.push(`the controls column scrolls sideways: ${col.scrollWidth} > ${col.clientWidth}`);
  const name = el => (el.querySelector('label') || {}).textContent || el.className.split(' ').filter(c => c.startsWith('widget-')).join(' ');
  for (const w of col.children) {
    const r = w.getBoundingClientRect();
    if (r.width === 0) continue;
    if (r.left < box.left - 1 || r.right > box.right + 1)
      problems.push(`"${name(w)}" (${px(r.left)}-${px(r.right)}) sticks out of the controls column (${px(box.left)}-${px(box.right)})`);
    if (w.scrollWidth > w.clientWidth + 1) problems.push(`"${name(w)}" scrolls sideways: ${w.scrollWidth} > ${w.clientWidth}`);
    for (const part of w.querySelectorAll('input, textarea, select, button, label, .widget-html-content, .sd-error')) {
      const q = part.getBoundingClientRect();
      if (q.width > 0 && (q.left < r.left - 1 || q.right > r.right + 1))
        problems.push(`a ${part.tagName.toLowerCase()} of "${name(w)}" (${px(q.left)}-${px(q.right)}) sticks out of it (${px(r.left)}-${px(r.right)})`);
    }
  }
  const results = document.querySelector('.sd-results');
  for (const el of [results, ...results.children, ...results.querySelectorAll('.main-svg')]) {
    const r = el.getBoundingClientRect();
    if (r.width > 0 && r.right > area.right + 1)
      problems.push(`a ${el.className.baseVal ?? el.className} of the results (${px(r.left)}-${px(r.right)}) is cut off by the output area (${px(area.left)}-${px(area.right)})`);
  }
  return problems;
}"""
COLUMN = "() => { const r = document.querySelector('.sd-controls').getBoundingClientRect(); return [r.left, r.right]; }"


def main(argv:list[str]) -> int:
    root = Path(__file__).resolve().parent.parent
    check_only = "--check" in argv
    rest = [a for a in argv if a != "--check"]
    out = Path(rest[0] if rest else root / "nbs" / "images" / "explorer.png")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium: sys.exit("no Chromium: run `bash .ci/dev-setup` (apt-get install chromium)")
    try: from playwright.sync_api import sync_playwright
    except ImportError: sys.exit("no playwright: run `bash .ci/dev-setup` (pip install -r .ci/dev-requirements.txt)")
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    token, home = secrets.token_hex(16), tempfile.mkdtemp(prefix="explorer-lab-")
    env = {**os.environ, "JUPYTER_CONFIG_DIR": home}    # no user settings; .venv's server config (outputs not saved) applies
    lab = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                            f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--allow-root",
                            f"--LabApp.workspaces_dir={home}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    problems, notebook = [], root / "nbs" / "explore.ipynb"
    tracked = notebook.read_bytes()
    try:
        for _ in range(120):
            try: urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2); break
            except OSError: time.sleep(1)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(f"http://127.0.0.1:{port}/lab/tree/nbs/explore.ipynb?token={token}")
            page.wait_for_selector(".jp-Notebook", timeout=120_000)
            page.wait_for_timeout(3000)
            for label in ("Select", "No"):                        # the kernel dialog; "get notified about Jupyter news?"
                button = page.get_by_role("button", name=label, exact=True)
                if button.count(): button.first.click()
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_text("Run All Cells", exact=True).click()
            run = page.locator(".sd-controls .widget-button", has_text="Run").first
            try: run.wait_for(timeout=300_000)
            except Exception:
                page.screenshot(path=str(out.with_suffix(".debug.png"))); raise
            page.wait_for_timeout(1500)
            problems += [f"before running: {m}" for m in page.evaluate(MEASURE)]
            run.click()
            page.wait_for_selector(".sd-badge", timeout=600_000)
            page.wait_for_timeout(1500)
            problems += [f"after running: {m}" for m in page.evaluate(MEASURE)]
            if not check_only:
                out.parent.mkdir(parents=True, exist_ok=True)
                page.locator(".jp-OutputArea-output").filter(has=page.locator(".sd-controls")).first.screenshot(path=str(out))
                print(out)
            before = page.evaluate(COLUMN)                        # a long error message wraps and moves nothing
            field = page.locator(".sd-controls .widget-text", has_text="prompt set").locator("input")
            field.fill("/" + "a-long-folder-name-that-does-not-exist/" * 6 + "prompts.jsonl")
            page.wait_for_selector(".sd-error", timeout=30_000)
            page.wait_for_timeout(500)
            problems += [f"with a long error: {m}" for m in page.evaluate(MEASURE)]
            if page.evaluate(COLUMN) != before: problems.append(f"a long error moved the controls column: {before} -> {page.evaluate(COLUMN)}")
            field.fill("builtin")
            page.wait_for_timeout(500)
            page.locator(".jp-Notebook").first.click(position={"x": 5, "y": 5})   # save as JupyterLab's autosave would
            page.keyboard.press("Control+s")
            page.wait_for_timeout(3000)
            saved = json.loads(notebook.read_text())
            if notebook.read_bytes() == tracked: problems.append("JupyterLab did not save nbs/explore.ipynb (the check saw nothing)")
            elif any(c.get("outputs") for c in saved["cells"]): problems.append("JupyterLab saved outputs into nbs/explore.ipynb")
            browser.close()
    finally:
        lab.terminate(); lab.wait(30)
        notebook.write_bytes(tracked)
        shutil.rmtree(home, ignore_errors=True)
    for m in problems: print("layout:", m)
    print(json.dumps({"layout_problems": len(problems)}))
    return 1 if problems else 0


if __name__ == "__main__": sys.exit(main(sys.argv[1:]))
