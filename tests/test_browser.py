"""A learner's view: JupyterLab in headless Chromium runs notebook 01 and the slice viewer answers its slider.

Run alone with `python -m pytest -m browser`. It needs Debian's `chromium` and `chromium-driver` (CI installs
them; nothing is downloaded at run time). The screenshots land in `test-output/browser/`.
"""

import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest

from alphagan.config import make_config

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "test-output" / "browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.browser
PROFILE = "cpu"  # 32^3 volumes, so the screenshot shows a recognisable brain; notebook 01 takes ~30 s with it
CENTRE = make_config(PROFILE).size // 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    """JupyterLab on 127.0.0.1 with a token, serving a copy of notebook 01 set to PROFILE."""
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("ALPHAGAN_REQUIRE_BROWSER"):
            pytest.fail("chromium and chromium-driver are required here (apt-get install chromium chromium-driver)")
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    nb = load_notebook_node(str(ROOT / "notebooks" / "01_data.ipynb"))
    nb = parameterize_notebook(nb, {"profile": PROFILE, "run_dir": str(tmp_path / "run")})
    nbformat.write(nb, tmp_path / "01_data.ipynb")
    port, token = _free_port(), "alphagan-browser-test"
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"),
    }
    with open(tmp_path / "lab.log", "w") as log:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyterlab",
                "--no-browser",
                "--ip=127.0.0.1",
                f"--port={port}",
                f"--IdentityProvider.token={token}",
                f"--ServerApp.root_dir={tmp_path}",
                "--allow-root",
                "--LabApp.news_url=None",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=env,
        )
        deadline = time.time() + 60
        while time.time() < deadline and server.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        else:
            server.kill()
            pytest.fail(f"JupyterLab did not start: {(tmp_path / 'lab.log').read_text()[-2000:]}")
        yield f"http://127.0.0.1:{port}", token
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--window-size=1400,1100",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _image(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=float)


@pytest.fixture
def page_on_failure(browser, request):
    """Keep a screenshot of the whole page when the test fails, to see what the learner would have seen."""
    shutil.rmtree(OUTPUT, ignore_errors=True)
    yield
    if getattr(request.node, "rep_call", None) is None or request.node.rep_call.failed:
        OUTPUT.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(OUTPUT / "page_at_failure.png"))


def test_slice_viewer_answers_its_slider_in_jupyterlab(lab, browser, page_on_failure):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, token = lab
    browser.get(f"{url}/lab/tree/01_data.ipynb?token={token}")
    wait = WebDriverWait(browser, 120)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")))
    # The kernel must be connected and idle before we run anything (the status bar says so).
    wait.until(
        ec.presence_of_element_located((By.XPATH, "//*[contains(@class,'jp-StatusBar')]//*[contains(., 'Idle')]"))
    )
    started = "//div[contains(@class,'jp-InputPrompt')][contains(., '[*]') or contains(., '[1]')]"
    for _ in range(3):  # Run > Run All Cells, as a learner would; again if the first click came too early
        wait.until(
            ec.element_to_be_clickable((By.XPATH, "//li[contains(@class,'lm-MenuBar-item')][.//div[text()='Run']]"))
        ).click()
        wait.until(
            ec.element_to_be_clickable(
                (By.XPATH, "//li[contains(@class,'lm-Menu-item')][.//div[text()='Run All Cells']]")
            )
        ).click()
        try:
            WebDriverWait(browser, 30).until(ec.presence_of_element_located((By.XPATH, started)))
            break
        except Exception:
            continue

    try:
        viewer = WebDriverWait(browser, 300).until(
            ec.presence_of_element_located((By.CSS_SELECTOR, ".jp-OutputArea-output .widget-vbox .widget-image"))
        )
    except Exception:
        errors = browser.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output[data-mime-type*='stderr']")
        prompts = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".jp-InputPrompt")]
        pytest.fail(f"no slice viewer after 300 s; prompts {prompts}; errors: {[e.text[-500:] for e in errors]}")
    box = viewer.find_element(By.XPATH, "ancestor::div[contains(@class,'widget-vbox')][last()]")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
    time.sleep(1.0)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    before = box.screenshot_as_png
    (OUTPUT / "viewer_before.png").write_bytes(before)

    def captions():
        return " | ".join(e.text for e in box.find_elements(By.CSS_SELECTOR, ".widget-label"))

    label = captions()
    assert f"axial {CENTRE}" in label

    handle = box.find_element(By.CSS_SELECTOR, ".widget-slider .noUi-handle")
    handle.click()
    for _ in range(3):
        handle.send_keys(Keys.ARROW_RIGHT)
    WebDriverWait(browser, 30).until(lambda _: f"axial {CENTRE + 3}" in captions())
    time.sleep(1.0)
    after = box.screenshot_as_png
    (OUTPUT / "viewer.png").write_bytes(after)

    a, b = _image(before), _image(after)
    assert a.shape == b.shape
    assert np.abs(a - b).mean() > 1.0, "the picture did not change when the slider moved"
    assert b.std() > 10, "the viewer shows no image"
