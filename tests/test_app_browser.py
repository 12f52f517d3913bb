"""The web app in a real browser: headless Chromium from the system's packages, driven by
Selenium, against `python -m iclora.app` running on the tiny models in a workspace of toy
data. Nothing is downloaded: the browser and its driver are the Debian packages chromium and
chromium-driver (scripts/test.sh installs them where missing).

    pytest tests/test_app_browser.py
    ICLORA_SCREENSHOTS=docs pytest tests/test_app_browser.py   # also saves docs/app_*.png
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import toy_dataset

pytest.importorskip("gradio", reason="the web app's extra: pip install 'iclora[ui]'")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs the system's chromium and chromedriver (apt-get install chromium chromium-driver)")
SCREENSHOTS = os.environ.get("ICLORA_SCREENSHOTS")
PROMPT = "a set of four panels"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("app_workspace")
    toy_dataset(root / "data")  # no LoRA yet: inpainting runs the tiny base (LoRAs: test_app_inpaint.py)
    return root


@pytest.fixture(scope="module")
def app(workspace):
    """The app as a user starts it; yields its URL."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "iclora.app", "--workspace", str(workspace), "--port", str(port),
                                "--max_upload_mb", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if "running at" in line or process.poll() is not None:
                break
        match = re.search(r"running at (http://127\.0\.0\.1:\d+/?)", line)
        assert match, f"the app did not start: {line!r}"
        yield match.group(1)
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(flag)
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for a browser online
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def wait(driver, seconds: float = 60):
    return WebDriverWait(driver, seconds, poll_frequency=0.25)


def field(driver, elem_id: str):
    """The text field of a Gradio widget (single-line ones are inputs or textareas)."""
    return driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input, #{elem_id} textarea")


def fill(driver, elem_id: str, text: str) -> None:
    box = field(driver, elem_id)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(text)
    box.send_keys(Keys.TAB)  # blur: Gradio takes the value on change


def value(driver, elem_id: str) -> str:
    return field(driver, elem_id).get_attribute("value")


def open_tab(driver, name: str) -> None:
    tab = next(b for b in driver.find_elements(By.CSS_SELECTOR, "button[role='tab']") if b.text.strip() == name)
    tab.click()


def screenshot(driver, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(SCREENSHOTS) / f"app_{name}.png"))


def test_inpaint_in_the_browser(app, browser, workspace):
    browser.get(app)
    wait(browser).until(EC.presence_of_element_located((By.CSS_SELECTOR, "#composite input[type=file]")))
    assert value(browser, "lora") == "none"  # the workspace holds no LoRA yet
    fill(browser, "base_model", "tiny-sdxl")
    browser.find_element(By.CSS_SELECTOR, "#composite input[type=file]").send_keys(str(workspace / "data" / "00001.png"))
    preview = wait(browser).until(EC.visibility_of_element_located((By.CSS_SELECTOR, "#panels_preview img")))
    wait(browser).until(lambda d: preview.size["width"] > 50)
    # The picture sits centred in its box (object-fit: scale-down, or contain): panels 2 and 3
    # are a quarter of its shown width left and right of the centre, a quarter of its height below.
    *natural, fit = browser.execute_script(
        "const i = arguments[0]; return [i.naturalWidth, i.naturalHeight, getComputedStyle(i).objectFit]", preview)
    scale = min(preview.size["width"] / natural[0], preview.size["height"] / natural[1])
    scale = min(scale, 1.0) if fit == "scale-down" else scale
    width, height = natural[0] * scale, natural[1] * scale
    for dx, dy in [(-width / 4, height / 4), (width / 4, height / 4)]:
        ActionChains(browser).move_to_element_with_offset(preview, int(dx), int(dy)).click().perform()
        time.sleep(0.5)
    wait(browser, 20).until(lambda d: value(d, "panels_text") == "2 3")
    fill(browser, "prompt", PROMPT)
    fill(browser, "steps", "2")
    fill(browser, "guidance", "1")
    browser.find_element(By.ID, "inpaint_run").click()
    wait(browser, 90).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#comparison img"))
    status = value(browser, "inpaint_status")
    assert status.startswith("wrote"), status
    assert browser.find_elements(By.CSS_SELECTOR, "#outputs img")
    written = workspace / "inpaint_output" / "base"
    assert (written / "00001_0.png").is_file() and (written / "00001_comparison.png").is_file()
    downloads = browser.find_element(By.ID, "downloads").text  # name and suffix in two elements
    assert "00001_0\n.png" in downloads and "00001_comparison" in downloads
    screenshot(browser, "inpaint")


def test_train_from_the_page(app, browser, workspace):
    browser.get(app)
    wait(browser).until(EC.presence_of_element_located((By.CSS_SELECTOR, "button[role='tab']")))
    open_tab(browser, "Train")
    fill(browser, "train_model", "tiny-sdxl")
    fill(browser, "train_data", "data")
    fill(browser, "train_output", "runs/web")
    for elem_id, text in [("train_steps", "2"), ("train_batch", "2"), ("train_rank", "4"), ("train_size", "64"),
                          ("train_validation", "2")]:
        fill(browser, elem_id, text)
    fill(browser, "train_extra", "--lora_alpha 4 --validation_inference_steps 2")
    browser.find_element(By.ID, "train_start").click()
    wait(browser, 20).until(lambda d: value(d, "train_status").startswith(("started", "running", "error")))
    assert not value(browser, "train_status").startswith("error"), value(browser, "train_status")
    # Closing the page does not stop the run: open it again and find the run from its folder.
    browser.get(app)
    wait(browser).until(EC.presence_of_element_located((By.CSS_SELECTOR, "button[role='tab']")))
    open_tab(browser, "Train")
    fill(browser, "train_output", "runs/web")
    wait(browser, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#samples img"))
    assert list((workspace / "runs" / "web" / "samples").glob("step_*/*_comparison.png"))
    wait(browser, 60).until(lambda d: value(d, "train_status").startswith("finished"))
    screenshot(browser, "train")


def test_data_tab_shows_a_composite_its_caption_and_checks(app, browser, workspace):
    browser.get(app)
    wait(browser).until(EC.presence_of_element_located((By.CSS_SELECTOR, "button[role='tab']")))
    open_tab(browser, "Data")
    fill(browser, "data_dir", "data")
    fill(browser, "data_model", "tiny-sdxl")
    fill(browser, "data_size", "64")
    browser.find_element(By.ID, "data_load").click()
    wait(browser, 60).until(lambda d: value(d, "data_caption").strip())
    assert value(browser, "data_caption") == (workspace / "data" / "00000.txt").read_text().strip()
    assert "markers match the 2x2 grid" in value(browser, "data_checks")
    assert value(browser, "data_report").startswith("dry run: data, grid 2x2")
    assert browser.find_elements(By.CSS_SELECTOR, "#data_picture img")
    screenshot(browser, "data")


def test_bad_input_and_big_uploads_are_refused_in_the_page(app, browser, workspace, tmp_path):
    browser.get(app)
    wait(browser).until(EC.presence_of_element_located((By.CSS_SELECTOR, "#composite input[type=file]")))
    fill(browser, "inpaint_out", "../elsewhere")
    fill(browser, "panels_text", "3")
    browser.find_element(By.ID, "inpaint_run").click()
    wait(browser, 30).until(lambda d: value(d, "inpaint_status").startswith("error:"))
    assert value(browser, "inpaint_status") == (
        f"error: output folder ../elsewhere: '..' is refused; give a path inside the workspace {workspace}")
    noise = np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "big.png")  # ~1.9 MB, over the app's --max_upload_mb 1
    browser.find_element(By.CSS_SELECTOR, "#composite input[type=file]").send_keys(str(tmp_path / "big.png"))
    wait(browser, 20).until(lambda d: "exceed the maximum allowed size of 1.0 Mb" in d.find_element(By.TAG_NAME, "body").text)
    assert not browser.find_elements(By.CSS_SELECTOR, "#composite img")
    assert not (workspace / "elsewhere").exists() and not list(workspace.rglob("big.png"))
