"""Smoke tests in headless Chromium: the comparison explorer renders in a real JupyterLab,
and the HTML report (``asg_probe.report.build_report``) opens with every figure loaded.

A notebook that builds a ``ComparisonExplorer`` on two tiny random models is
written to a temporary folder, JupyterLab serves it on a free localhost port,
Selenium drives Debian's ``chromium`` (through ``chromedriver``) to open it and
run every cell, and the test waits until the explorer's controls and panel
images are in the page. A screenshot is kept under ``test-artifacts/`` whatever
the outcome.

Needs ``apt-get install chromium chromium-driver`` and ``pip install selenium``:
without them the test fails and says so (it is never skipped).
"""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = os.environ.get("ASG_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("ASG_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1500,1100")
SERVER_START_S = 40
# The first render in a fresh environment includes JupyterLab's build check (~30 s), the kernel's
# imports and numba compiling UMAP; on a loaded 2-core CI machine that once took longer than 90 s
# (the explorer never drew within it although it renders). The wait ends as soon as it renders.
RENDER_S = 240

NOTEBOOK_CELLS = [
    "import torch\n"
    "torch.set_num_threads(1)  # tiny matrices; threads only contend on a busy machine\n"
    "import asg_probe\n"
    "from asg_probe.widgets import ComparisonExplorer",
    "torch.manual_seed(0)\n"
    "models = {p: asg_probe.create_model('vit_tiny_patch4_32', pos=p, depth=2) for p in ('none', 'ape')}\n"
    "images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))\n"
    "explorer = ComparisonExplorer(models, images=images, layer=1, embedding='pca')\n"
    "explorer",
]


def _require_browser():
    """The selenium module and the Debian browser and driver, or a failure that says what to install."""
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the Python package `selenium` (pip install selenium)")
    for path, pkg in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            missing.append(f"{path} (apt-get install -y {pkg})")
    if missing:
        pytest.fail("the browser smoke test needs " + "; ".join(missing), pytrace=False)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_notebook(folder: Path) -> Path:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in NOTEBOOK_CELLS]
    # A named kernel: otherwise JupyterLab asks which kernel to start, in a dialog.
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    path = folder / "explorer.ipynb"
    nbformat.write(nb, path)
    return path


def _start_lab(root: Path, port: int, token: str, log):
    env = dict(os.environ)
    # Private config/runtime/workspace folders: no state from the developer's own JupyterLab,
    # and nothing left behind.
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                     ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"), ("JUPYTERLAB_SETTINGS_DIR", "settings"),
                     ("IPYTHONDIR", "ipython")):
        (root / sub).mkdir(exist_ok=True)
        env[var] = str(root / sub)
    # No "get Jupyter news?" toast over the widget in the screenshot (and no attempt to fetch news).
    notification = root / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True)
    notification.write_text('{"fetchNews": "false"}')
    env.pop("JUPYTER_TOKEN", None)
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--port-retries=0", f"--ServerApp.root_dir={root / 'nb'}", f"--IdentityProvider.token={token}",
           "--LabApp.news_url=", "--allow-root",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_server(proc, port, token, log_path):
    url = f"http://127.0.0.1:{port}/api/status?token={token}"
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{_tail(log_path)}", pytrace=False)
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    pytest.fail(f"jupyter lab did not answer within {SERVER_START_S} s:\n{_tail(log_path)}", pytrace=False)


def _stop_lab(proc, port, token):
    if proc.poll() is None:
        try:  # the server's own shutdown also stops the kernels it started
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api/shutdown?token={token}", method="POST")
            urllib.request.urlopen(req, timeout=5).close()
        except OSError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def _tail(path, n=40):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _chrome(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for driver.get_log
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


# Where the notebook stands, read from the page in one call: cheap to poll.
_PAGE_STATE_JS = """
const ex = document.querySelector('.asg-comparison-explorer');
const imgs = ex ? [...ex.querySelectorAll('img')] : [];
return {
  notebook: !!document.querySelector('.jp-NotebookPanel .jp-Cell'),
  explorer: !!ex,
  sliders: ex ? ex.querySelectorAll('.widget-slider, .jupyter-widgets.widget-slider').length : 0,
  images: imgs.length,
  images_drawn: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
  errors: [...document.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
          .map(e => e.innerText).filter(t => /Traceback|Error/.test(t)).join('\\n').slice(0, 2000),
  explorer_error: ex ? /Traceback/.test(ex.innerText) : false,
};
"""


def _run_all_cells(driver, wait_s):
    """Run > Run All Cells, through the menu as a person would."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.common.action_chains import ActionChains

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        run_menu = [m for m in driver.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-item") if m.text.strip() == "Run"]
        if run_menu:
            run_menu[0].click()
            opened = time.monotonic()
            while time.monotonic() - opened < 3:
                # by its label: the command behind it has changed name across JupyterLab versions
                items = [i for i in driver.find_elements(By.CSS_SELECTOR, "#jp-mainmenu-run li.lm-Menu-item")
                         if i.text.splitlines()[:1] == ["Run All Cells"] and i.is_displayed()]
                if items:
                    items[0].click()
                    return
                time.sleep(0.2)
            ActionChains(driver).send_keys(Keys.ESCAPE).perform()  # close the menu and try again
        time.sleep(0.5)
    raise AssertionError("JupyterLab's Run > Run All Cells menu item never appeared")


@pytest.mark.browser
def test_explorer_renders_in_jupyterlab(tmp_path):
    _require_browser()
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "widgets_explorer_jupyterlab.png"
    (tmp_path / "nb").mkdir()
    _write_notebook(tmp_path / "nb")
    port, token = _free_port(), "asg-widgets-smoke"
    log_path = tmp_path / "jupyter.log"
    driver = None
    with open(log_path, "w") as log:
        proc = _start_lab(tmp_path, port, token, log)
        try:
            _wait_for_server(proc, port, token, log_path)
            driver = _chrome(tmp_path / "chromium-profile")
            driver.set_page_load_timeout(30)
            # ?reset: start from a clean workspace, with just this notebook open.
            driver.get(f"http://127.0.0.1:{port}/lab/tree/explorer.ipynb?reset&token={token}")
            deadline = time.monotonic() + RENDER_S
            state = {}
            while time.monotonic() < deadline and not state.get("notebook"):
                state = driver.execute_script(_PAGE_STATE_JS)
                time.sleep(0.5)
            assert state.get("notebook"), f"the notebook never opened: {state}\n{_tail(log_path)}"
            _run_all_cells(driver, wait_s=max(5.0, deadline - time.monotonic()))
            while time.monotonic() < deadline:
                state = driver.execute_script(_PAGE_STATE_JS)
                # 2 models x 3 panels, and the layer/row/col/image sliders
                if state["explorer"] and state["sliders"] >= 4 and state["images_drawn"] >= 6:
                    break
                time.sleep(0.5)
            time.sleep(0.5)  # let the last panel images paint before the picture
            driver.save_screenshot(str(screenshot))
            assert state.get("explorer"), (f"the explorer widget never rendered within {RENDER_S} s: {state}\n"
                                           f"{_tail(log_path)}")
            assert state["sliders"] >= 4 and state["images_drawn"] >= 6, f"incomplete explorer: {state}"
            assert not state["errors"], f"a cell failed:\n{state['errors']}"
            assert not state["explorer_error"], "the explorer shows a traceback (see the screenshot)"
        finally:
            if driver is not None:
                try:
                    if not screenshot.exists():
                        driver.save_screenshot(str(screenshot))
                finally:
                    driver.quit()
            _stop_lab(proc, port, token)
    shutil.copy(log_path, ARTIFACTS / "widgets_explorer_jupyter.log")
    assert screenshot.stat().st_size > 10_000


# What the report page shows, read in one call.
_REPORT_STATE_JS = """
const imgs = [...document.querySelectorAll('img')];
return {
  ready: document.readyState,
  headings: [...document.querySelectorAll('h2')].map(h => h.innerText),
  images: imgs.length,
  loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
  squeezed: imgs.filter(i => i.naturalWidth > 0 && i.clientWidth < i.naturalWidth / window.devicePixelRatio - 1)
                .map(i => [i.clientWidth, i.naturalWidth]),
  first_img_top: imgs.length ? imgs[0].getBoundingClientRect().top + window.scrollY : -1,
  summary_top: (() => { const t = document.querySelector('table.summary');
                        return t ? t.getBoundingClientRect().top + window.scrollY : -1; })(),
  summary_rows: document.querySelectorAll('table.summary tbody tr').length,
};
"""


@pytest.mark.browser
def test_report_renders_in_chromium_with_every_figure_loaded(tmp_path):
    _require_browser()
    import torch

    import asg_probe
    from asg_probe.report import build_report

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "report_chromium.png"
    models = [(asg_probe.create_model("vit_tiny_patch4_32", pos=p, depth=1), p) for p in ("ape", "none")]
    images = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    page = build_report(models, tmp_path / "report", images=images, progress=False, with_resolution=False)
    driver = _chrome(tmp_path / "chromium-profile")
    try:
        driver.set_page_load_timeout(30)
        driver.get(page.resolve().as_uri())
        deadline = time.monotonic() + 30
        state = driver.execute_script(_REPORT_STATE_JS)
        while time.monotonic() < deadline and (state["ready"] != "complete" or state["loaded"] < state["images"]):
            time.sleep(0.3)
            state = driver.execute_script(_REPORT_STATE_JS)
        driver.set_window_size(1500, max(1100, int(driver.execute_script("return document.body.scrollHeight"))))
        driver.save_screenshot(str(screenshot))
        console = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    finally:
        driver.quit()
    assert not console, f"console errors: {console}"
    assert state["images"] >= 11 and state["loaded"] == state["images"], f"figures not loaded: {state}"
    assert not state["squeezed"], f"figures drawn narrower than their natural width: {state['squeezed']}"
    assert state["headings"][:2] == ["Provenance", "Summary"], state["headings"]
    assert 0 <= state["summary_top"] < state["first_img_top"], "the summary table must come before any figure"
    assert state["summary_rows"] == 2
