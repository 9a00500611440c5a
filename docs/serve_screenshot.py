"""Make the README's screenshot of the page (docs/serve.png): an LA MRI test volume of ../shared/data/la-mri opened
in `imedsam serve` (LiteMedSAM), a box drawn on the middle slice around the left atrium (the ground truth's tight
box), then propagated through the volume. Needs chromium + chromedriver and selenium (the test extra).

Usage: python docs/serve_screenshot.py [--out docs/serve.png]
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LA = ROOT.parent / "shared" / "data" / "la-mri"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "serve.png"))
    ap.add_argument("--case", default=None, help="an imagesTs file name (default: the first)")
    args = ap.parse_args()
    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains

    from imedsam import io
    from imedsam.serve import ServeSettings, create_app

    volume = LA / "imagesTs" / args.case if args.case else sorted((LA / "imagesTs").glob("*.nii.gz"))[0]
    label = io.read(LA / "labelsTs" / volume.name.replace("_0000", "")).array > 0
    k = int(np.argmax(label.sum(axis=(1, 2))))
    ys, xs = np.nonzero(label[k])
    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)

    app = create_app(ServeSettings(model="litemedsam"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--window-size=1280,800",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        driver.find_element("id", "file").send_keys(str(volume))
        wait = "return window.imedsam.session !== null && window.imedsam.busy === 0 && window.imedsam.labels.size"
        while not driver.execute_script(wait):
            time.sleep(0.1)
        driver.execute_script(f"document.getElementById('slice').value = {k};"
                              "document.getElementById('slice').dispatchEvent(new Event('input'));")
        while not driver.execute_script(f"return window.imedsam.slice === {k} && window.imedsam.labels.has({k})"):
            time.sleep(0.1)
        canvas = driver.find_element("id", "draw")
        w, h, cw, ch = driver.execute_script(
            "const c = document.getElementById('draw'), r = c.getBoundingClientRect();"
            "return [c.width, c.height, r.width, r.height];")

        def at(x, y):
            return round((x / w - 0.5) * cw), round((y / h - 0.5) * ch)

        ActionChains(driver).move_to_element_with_offset(canvas, *at(box[0], box[1])).click_and_hold() \
            .move_to_element_with_offset(canvas, *at(box[2], box[3])).release().perform()
        while not driver.execute_script("return window.imedsam.last !== null && window.imedsam.busy === 0"):
            time.sleep(0.1)
        driver.find_element("id", "propagate").click()
        time.sleep(0.3)
        while driver.execute_script("return window.imedsam.busy") != 0:
            time.sleep(0.2)
        driver.execute_script("document.getElementById('draw').getContext('2d').clearRect(0, 0, 9999, 9999)")
        driver.save_screenshot(args.out)
        print(f"wrote {args.out}: {volume.name}, slice {k}, box {box}")
    finally:
        driver.quit()
        server.should_exit = True
    return 0


if __name__ == "__main__":
    sys.exit(main())
