"""The page driven in headless Chromium (Debian's chromium + chromium-driver, through Selenium), against a real
uvicorn server with LiteMedSAM: open the pydicom CT slice, draw a box, compare the downloaded mask with
`imedsam segment` for the same box, add a background click, open a small NIfTI volume, scroll, and segment a
3-D box (drawn box, first and last slice marked with keys). A screenshot of
each step is kept in test-artifacts/serve/."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from imedsam.io.samples import embedded_ct_slice
from tests.serve.conftest import decode_png

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "serve"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _need_browser():
    missing = [n for n, p in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if p is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install 'imedsam[test]')")
    if missing:
        reason = f"browser tests need {', '.join(missing)} (apt install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(reason + ": CI must run them (.ci/run installs the browser)")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def litemedsam():
    from imedsam.infer.segmenter import Segmenter

    try:
        return Segmenter("litemedsam", device="cpu", precision="fp32")
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("CI"):
            raise
        pytest.skip(f"LiteMedSAM weights unavailable: {exc}")


@pytest.fixture(scope="module")
def server(litemedsam):
    _need_browser()
    import uvicorn

    from imedsam.serve import ServeSettings, create_app

    app = create_app(ServeSettings(model="litemedsam", device="cpu", precision="fp32"),
                     segmenters={"litemedsam": litemedsam})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started:
        assert time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,860"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chrome-profile')}")
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def _wait(driver, condition, what: str, timeout: float = 60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = driver.execute_script(condition)
        if value:
            return value
        time.sleep(0.05)
    status = driver.execute_script("return document.getElementById('status').textContent")
    raise AssertionError(f"timed out waiting for {what}; status: {status}")


def _ready(driver, what: str, before: int):
    _wait(driver, f"return window.imedsam.busy === 0 && document.getElementById('status').dataset.state === 'ready'"
                  f" && window.imedsam.version >= {before}", what)


def _offset(driver, x: float, y: float) -> tuple[int, int]:
    """Image pixel (x, y) -> offset from the centre of the #draw canvas, in CSS pixels (Selenium's origin)."""
    w, h, cw, ch = driver.execute_script(
        "const c = document.getElementById('draw'), r = c.getBoundingClientRect();"
        "return [c.width, c.height, r.width, r.height];")
    return round((x / w - 0.5) * cw), round((y / h - 0.5) * ch)


def _open(driver, path: Path) -> None:
    version = driver.execute_script("return window.imedsam.version")
    driver.find_element("id", "file").send_keys(str(path))
    _wait(driver, f"return window.imedsam.version > {version} && window.imedsam.busy === 0 && "
                  "window.imedsam.labels.has(window.imedsam.slice)", f"{path.name} to open")


def _labels(driver) -> np.ndarray:
    data = driver.execute_script("return window.imedsam.last.labels")
    return decode_png(data)


def test_box_click_download_and_volume_scroll(server, browser, tmp_path, capsys):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    from selenium.webdriver.common.keys import Keys

    from imedsam.cli import main

    driver = browser
    driver.get(server + "/")
    _wait(driver, "return document.getElementById('model').options.length > 0", "the model list")
    driver.save_screenshot(str(ARTIFACTS / "0-empty.png"))

    ct = embedded_ct_slice()
    _open(driver, ct)
    driver.save_screenshot(str(ARTIFACTS / "1-opened.png"))

    canvas = driver.find_element("id", "draw")
    a, b = _offset(driver, 30, 40), _offset(driver, 100, 110)
    ActionChains(driver).move_to_element_with_offset(canvas, *a).click_and_hold() \
        .move_to_element_with_offset(canvas, *b).release().perform()
    _wait(driver, "return window.imedsam.last !== null && window.imedsam.busy === 0", "the box's mask")
    driver.save_screenshot(str(ARTIFACTS / "2-box.png"))
    box = driver.execute_script("return window.imedsam.lastPrompt.box")
    boxed = _labels(driver)
    assert boxed.shape == (128, 128) and (boxed == 1).sum() > 50

    driver.find_element("id", "download").click()
    target = driver.downloads / "CT_small_labels.png"
    deadline = time.time() + 30
    while not target.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert target.exists(), f"no download in {list(driver.downloads.iterdir())}"
    downloaded = decode_png(target.read_bytes())

    out = tmp_path / "cli.png"
    assert main(["segment", str(ct), "--box", *map(str, box), "--out", str(out), "--model", "litemedsam",
                 "--device", "cpu", "--precision", "fp32"]) == 0
    capsys.readouterr()
    cli = decode_png(out.read_bytes())
    np.testing.assert_array_equal(downloaded > 0, cli > 0)

    ys, xs = np.nonzero(boxed == 1)
    i = len(ys) // 2
    area_before = int((boxed == 1).sum())
    ActionChains(driver).move_to_element_with_offset(canvas, *_offset(driver, xs[i] + 0.5, ys[i] + 0.5)) \
        .context_click().perform()
    _wait(driver, "return window.imedsam.lastPrompt.label === 0 && window.imedsam.busy === 0 && "
                  "window.imedsam.last.labels !== null", "the background click's mask")
    _wait(driver, f"return window.imedsam.last.area !== {area_before}", "the mask to change", timeout=30)
    clicked = _labels(driver)
    assert not np.array_equal(clicked == 1, boxed == 1)
    driver.save_screenshot(str(ARTIFACTS / "3-background-click.png"))

    import nibabel as nib

    data = np.full((48, 40, 7), 10.0, np.float32)
    data[15:30, 10:25, 1:6] = 200.0
    vol = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.9, 2.5, 1.0])), vol)
    _open(driver, vol)
    assert driver.execute_script("return window.imedsam.slice") == 3
    info_before = driver.find_element("id", "sliceinfo").text
    ActionChains(driver).scroll_from_origin(ScrollOrigin.from_element(canvas), 0, 120).perform()
    _wait(driver, "return window.imedsam.slice === 4 && window.imedsam.labels.has(4)", "the next slice")
    assert driver.find_element("id", "sliceinfo").text != info_before == "slice 4 / 7"
    driver.save_screenshot(str(ARTIFACTS / "4-volume-scrolled.png"))

    # a 3-D box: draw it on slice 4 (the bright block spans x 15..30, y 10..25, slices 1..5), mark slice 4 as
    # its first slice (F), go down 2 slices, mark the last (L), segment (B): slices 2..4 get the object
    ActionChains(driver).move_to_element_with_offset(canvas, *_offset(driver, 13, 8)).click_and_hold() \
        .move_to_element_with_offset(canvas, *_offset(driver, 32, 27)).release().perform()
    _wait(driver, "return window.imedsam.box !== null && window.imedsam.busy === 0", "the drawn box")
    driver.execute_script("document.activeElement.blur()")  # keys go to the page, not the file input
    ActionChains(driver).send_keys("f").send_keys(Keys.ARROW_DOWN).send_keys(Keys.ARROW_DOWN).perform()
    _wait(driver, "return window.imedsam.slice === 2", "slice 2")
    ActionChains(driver).send_keys("l").send_keys("b").perform()
    _wait(driver, "return window.imedsam.last && window.imedsam.last.changed_slices.length >= 3 && "
                  "window.imedsam.busy === 0", "the 3-D box's masks")
    assert "3-D box slices 5–3" in driver.find_element("id", "sliceinfo").text
    changed = driver.execute_script("return window.imedsam.last.changed_slices")
    assert sorted(changed) == [2, 3, 4], changed
    assert (_labels(driver) == 1).sum() > 50  # slice 2's plane, inside the block
    driver.save_screenshot(str(ARTIFACTS / "5-volume-box3d.png"))
    logs = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not logs, logs
