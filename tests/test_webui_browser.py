"""The web page in a real browser: ``didp ui --weights tiny`` driven in headless Chromium (Debian's
``chromium`` package, through Playwright; no browser download).

It types a caption and runs it, watches the frames come one by one and then the final picture,
downloads ``result.json`` and checks its seed, sees a refused combination's message, stops a long
run with Cancel, sees a second page's run wait in the queue while another runs, and a page closed
mid-run free the model for the next.

``DIDP_UI_SCREENSHOT=docs/ui.png`` also saves a screenshot of the page after the first run (the
README's picture is made so).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CAPTION = "a lighthouse on a cliff at night"
# Small and quick on the tiny models: 4 scales, 4 cutouts, 8 prior steps, a frame every step.
QUICK = {"display_freq": "1", "num_scales": "4", "num_cutouts": "4", "prior_steps": "8"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    base = tmp_path_factory.mktemp("ui")
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DIDP_OUTPUT_DIR": str(base / "outputs"),
        "GRADIO_TEMP_DIR": str(base / "gradio"),
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    log = (base / "ui.log").open("w")
    command = [sys.executable, "-m", "commands.didp", "ui", "--weights", "tiny", "--port", str(port)]
    server = subprocess.Popen([*command, "--files", str(base / "files")], cwd=ROOT, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (base / "ui.log").read_text()
            try:
                if requests.get(url, timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "the page did not start in 300 s"
            time.sleep(0.5)
        yield url
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail("headless Chromium is needed: apt-get install chromium")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


def _open(browser, url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page.goto(url)
    page.wait_for_selector("#didp-run")
    return page


def _set(page, name: str, value: str) -> None:
    """Type ``value`` into input ``name``'s box (a slider's number box, a number or a text box)."""
    box = page.locator(f"#input-{name} input[type=number], #input-{name} textarea, #input-{name} input[type=text]")
    box.first.fill(value)
    box.first.press("Tab")


def _open_advanced(page) -> None:
    if not page.locator("#input-display_freq").is_visible():
        page.locator("#didp-advanced").get_by_text("Advanced").first.click()
        page.wait_for_selector("#input-display_freq", state="visible")


def _status(page) -> str:
    return page.inner_text("#didp-status-text")


def _alts(page, where: str) -> list[str]:
    return page.locator(f"{where} img").evaluate_all("images => images.map(image => image.alt)")


def _wait_for(page, condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout} s; status: {_status(page)!r}")


def test_a_caption_runs_frames_come_in_order_then_the_final_picture(browser, page_url):
    page = _open(browser, page_url)
    assert "the pictures and embeddings mean nothing" in page.inner_text("#didp-tiny-note")
    page.fill("#input-prompt textarea", CAPTION)
    _set(page, "iterations", "3")
    _set(page, "seed", "42")
    _open_advanced(page)
    for name, value in QUICK.items():
        _set(page, name, value)
    page.click("#didp-run")
    seen = []  # (frames' captions, final pictures shown, status) every 0.2 s
    deadline = time.monotonic() + 240
    while not _status(page).startswith(("Done", "Failed", "Refused")):
        seen.append((tuple(_alts(page, "#didp-frames")), len(_alts(page, "#didp-final")), _status(page)))
        assert time.monotonic() < deadline, seen[-1]
        time.sleep(0.2)
    assert _status(page) == "Done: 7 files, seed 42.", _status(page)
    frames = _wait_for(
        page, lambda: _alts(page, "#didp-frames") if len(_alts(page, "#didp-frames")) == 3 else None, 10, "3 frames"
    )
    assert frames == ["step 1", "step 2", "step 3"]
    finals = _alts(page, "#didp-final")
    assert len(finals) == 1 and finals[0].startswith("final · to text ")
    # the frames came one by one, in order, while the run went on, and the final picture after them
    shown = [list(f) for f, _, _ in seen]
    for earlier, later in zip(shown, shown[1:], strict=False):
        assert later[: len(earlier)] == earlier or later == [], (earlier, later)
    assert any(f == ["step 1"] and final == 0 for f, final, _ in [(list(f), n, s) for f, n, s in seen])
    assert any(f == ["step 1", "step 2"] and final == 0 for f, final, _ in [(list(f), n, s) for f, n, s in seen])
    first_final = next((i for i, (_, n, _) in enumerate(seen) if n), len(seen))
    assert all(len(f) >= 2 for f, _, _ in seen[first_final:])
    assert any("step 1 / 3 · similarity" in status for _, _, status in seen)
    assert page.input_value("#didp-seed input") == "42"
    # result.json, downloaded
    with page.expect_download() as download:
        page.click('#didp-downloads a[download="result.json"]')
    result = json.loads(Path(download.value.path()).read_text())
    assert result["seed"] == 42 and result["inputs"]["prompt"] == CAPTION and result["inputs"]["iterations"] == 3
    assert result["weights"]["name"] == "tiny"
    downloads = page.locator("#didp-downloads a[download]").evaluate_all("links => links.map(link => link.download)")
    assert downloads == ["text_tokens.npy", "text_embedding.npy", "image_embedding.npy", "result.json"]
    # the seed of the run back into the form
    _set(page, "seed", "-1")
    page.click("#didp-reuse-seed")
    _wait_for(page, lambda: page.input_value("#input-seed input") == "42", 10, "the seed back in the form")
    if screenshot := os.environ.get("DIDP_UI_SCREENSHOT"):
        page.locator("#didp-advanced").get_by_text("Advanced").first.click()  # fold it for the picture
        page.wait_for_selector("#input-display_freq", state="hidden")
        page.screenshot(path=str(ROOT / screenshot), full_page=True)
    page.close()


def test_a_combination_that_cannot_work_is_refused_on_the_page(browser, page_url):
    page = _open(browser, page_url)
    page.fill("#input-prompt textarea", CAPTION)
    _open_advanced(page)
    _set(page, "interpolation_steps", "4")
    page.click("#didp-run")
    message = _wait_for(page, lambda: _status(page) if _status(page).startswith("Refused") else None, 30, "a refusal")
    assert message == "Refused: interpolation_steps needs interpolate_to or edit_prompt"
    assert page.get_attribute("#didp-status .didp-status", "data-state") == "refused"
    _set(page, "interpolation_steps", "")
    _set(page, "interpolate_to", "a forest at dawn")
    _set(page, "num_outputs", "2")
    page.click("#didp-run")
    message = _wait_for(page, lambda: _status(page) if "num_outputs=2" in _status(page) else None, 30, "a refusal")
    assert message.startswith("Refused: num_outputs=2 cannot be combined with an interpolation")
    page.close()


def test_a_picture_upload_runs_an_image_variation(browser, page_url, tmp_path):
    from PIL import Image

    picture = tmp_path / "lighthouse.png"
    Image.new("RGB", (320, 240), (200, 120, 40)).save(picture)
    page = _open(browser, page_url)
    page.fill("#input-prompt textarea", CAPTION)
    _set(page, "iterations", "1")
    _open_advanced(page)
    for name, value in QUICK.items():
        _set(page, name, value)
    page.locator("#input-image input[type=file]").set_input_files(str(picture))
    page.wait_for_selector("#input-image img")
    page.click("#didp-run")
    _wait_for(page, lambda: _status(page).startswith(("Done", "Failed", "Refused")), 240, "the end of the run")
    assert _status(page).startswith("Done: "), _status(page)
    with page.expect_download() as download:
        page.click('#didp-downloads a[download="result.json"]')
    result = json.loads(Path(download.value.path()).read_text())
    assert result["inputs"]["image"] == "(a file)" and result["image"] == {"width": 320, "height": 240}
    assert result["prior"] is None  # the picture gave the target, not the prior
    page.close()


def test_cancel_stops_a_long_run_and_a_second_run_waits_in_the_queue(browser, page_url):
    first, second = _open(browser, page_url), _open(browser, page_url)
    for page in (first, second):
        page.fill("#input-prompt textarea", CAPTION)
        _set(page, "iterations", "1000")
        _open_advanced(page)
        for name, value in QUICK.items():
            _set(page, name, value)
    first.click("#didp-run")
    _wait_for(first, lambda: "step 1 / 1000" in _status(first) or _alts(first, "#didp-frames"), 120, "a first frame")
    # a second page's run waits in the queue while the first runs
    second.click("#didp-run")
    queued = _wait_for(second, lambda: "queue" in second.inner_text("#didp-status").lower(), 30, "a queue position")
    assert queued and _status(second) == "Ready."
    started = time.monotonic()
    first.click("#didp-cancel")
    ended = _wait_for(first, lambda: _status(first) if _status(first).startswith("Cancelled") else None, 60, "cancel")
    assert time.monotonic() - started < 60
    step = int(ended.split("at step ")[1].split(":")[0]) if "at step" in ended else 0
    assert step < 1000, ended
    assert "kept the" in ended and "(no result.json)" in ended
    kept = first.locator("#didp-downloads a[download]").evaluate_all("links => links.map(link => link.download)")
    assert kept == ["text_tokens.npy", "text_embedding.npy", "image_embedding.npy"]
    assert len(_alts(first, "#didp-frames")) >= 1  # the frames written before the cancel stay
    # then the second page's run starts; Cancel on the first page does not stop it
    _wait_for(second, lambda: _status(second).startswith("Seed "), 60, "the queued run to start")
    first.click("#didp-cancel")
    time.sleep(2)
    assert _status(second).startswith("Seed "), _status(second)
    first.close()
    # a page that goes away mid-run stops its run, and the next page's run goes at once
    second.close()
    third = _open(browser, page_url)
    third.fill("#input-prompt textarea", CAPTION)
    _open_advanced(third)
    third.locator("#input-mode input[value=embed]").check()
    _set(third, "prior_steps", "8")
    third.click("#didp-run")
    done = _wait_for(
        third, lambda: _status(third) if _status(third).startswith(("Done", "Refused")) else None, 90, "done"
    )
    assert done.startswith("Done: 4 files"), done
    third.close()
