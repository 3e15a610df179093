"""The web page in a real browser: Debian's headless Chromium driven by Playwright (its own browser
download cannot work here). A person's steps: open the page, upload a scikit-image photo, type a
prompt, ask for two images, press Run, wait for the gallery, read the timings; screenshot saved;
in a second tab, Run without a photo shows the message.

SDCN_APP_PRESET (default tiny) picks the model and SDCN_APP_SCREENSHOT where the screenshot goes:
docs/app.png was made with SDCN_APP_PRESET=tiny-trained SDCN_APP_SCREENSHOT=docs/app.png."""
from __future__ import annotations

import os
import re
from pathlib import Path

import PIL.Image
import pytest

CHROMIUM = Path(os.environ.get("SDCN_CHROMIUM", "/usr/bin/chromium"))
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}: apt-get install chromium "
                                                               "(CI's .ci/run installs it)")
pytest.importorskip("gradio", reason="the web page needs Gradio: pip install 'sdcn_trt[app]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test drives Chromium with Playwright")

from tests.test_app_server import free_port  # noqa: E402

# quiet, offline Chromium: without the background-networking flags it keeps calling home
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SAMPLES, RESOLUTION, STEPS, SEED = 2, 256, 10, 2946901


def test_a_person_generates_images_in_chromium(tmp_path):
    import skimage.data

    from sdcn_trt import ControlNetPipeline
    from sdcn_trt.app import serve

    photo = tmp_path / "chelsea.png"
    PIL.Image.fromarray(skimage.data.chelsea()).save(photo)  # 300x451: 256x384 at resolution 256
    screenshot = Path(os.environ.get("SDCN_APP_SCREENSHOT", tmp_path / "app.png"))
    server = serve(ControlNetPipeline.from_preset(os.environ.get("SDCN_APP_PRESET", "tiny")), port=free_port(),
                   block=False)
    outside: list[str] = []
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            page = context.new_page()
            page.on("request", lambda r: None if r.url.startswith(server.local_url) else outside.append(r.url))
            page.goto(server.local_url)
            page.wait_for_load_state("networkidle")  # the page's scripts have set its controls up
            page.set_input_files("input[type=file]", str(photo))
            page.get_by_label("Prompt", exact=True).fill("a cat")
            page.get_by_text("Advanced options").click()
            wanted = {"Images": SAMPLES, "Image Resolution": RESOLUTION, "Steps": STEPS, "Seed (-1: random)": SEED}
            fields = {label: page.get_by_label(f"number input for {label}") for label in wanted}
            for _ in range(5):  # as a person would: type the values again if the page has not kept them all
                for label, value in wanted.items():
                    fields[label].fill(str(value))
                    fields[label].press("Tab")
                page.wait_for_timeout(500)
                shown = {label: fields[label].input_value() for label in wanted}
                if shown == {label: str(value) for label, value in wanted.items()}:
                    break
            else:
                raise AssertionError(f"the page did not keep the values typed: {shown}")
            page.get_by_role("button", name="Run", exact=True).click()
            page.wait_for_selector("#timings table", timeout=300_000)
            try:
                page.wait_for_function("document.querySelectorAll('#gallery img').length >= 3", timeout=120_000)
            except sync_api.TimeoutError:
                page.screenshot(path=str(tmp_path / "timeout.png"), full_page=True)
                raise AssertionError(f"the gallery did not show {1 + SAMPLES} images; the page says: "
                                     + page.inner_text("body")[:3000]) from None
            sizes = page.eval_on_selector_all(
                "#gallery img", "els => els.map(e => [e.naturalWidth, e.naturalHeight])")
            timings = page.inner_text("#timings")
            seed = page.get_by_label("Seed used").input_value()
            page.screenshot(path=str(screenshot), full_page=True)
            second = context.new_page()  # a second tab: Run without a photo shows why in the page
            second.goto(server.local_url)
            second.get_by_role("button", name="Run", exact=True).click()
            second.get_by_text("no image: upload a photo first").first.wait_for(timeout=30_000)
            browser.close()
    finally:
        server.close()
    assert sizes[:1 + SAMPLES] == [[384, 256]] * (1 + SAMPLES)  # the inverted edge map, then the images
    assert seed == str(SEED)
    assert re.search(r"\d+\.\d+ images/s", timings) and "denoising" in timings and "total" in timings
    assert screenshot.stat().st_size > 0
    assert outside == []  # the page fetched nothing from outside the server
