"""The web page of `sdtorch serve`, driven in a real browser (Playwright + Debian's Chromium) against the real
server on loopback with the built-in shapes model (64x64 pictures, fast on a CPU).

Chromium comes from the Debian packages `chromium` and `chromium-driver` (`bash scripts/setup.sh` installs
them); without it these tests FAIL with a message saying so, they never skip. No browser is ever downloaded.

SDTORCH_WEB_TEST_URL=http://127.0.0.1:7860/ runs them against a server you started yourself instead;
SDTORCH_WEB_SCREENSHOT=docs/web-page.png keeps the screenshot of the page after a generation (README).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, PngImagePlugin

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu"]
START_TIMEOUT = 120  # seconds for the server to answer (importing torch and loading the model on a busy CPU)
JOB_TIMEOUT = 60_000  # ms for one generation


# ---- the server and the browser -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "sdapi/v1/samplers", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The base URL of a real `sdtorch serve` with the built-in model, on 127.0.0.1 and a free port."""
    given = os.environ.get("SDTORCH_WEB_TEST_URL")
    if given:
        yield given.rstrip("/") + "/"
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    log = tmp_path_factory.mktemp("server") / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the 64 px model gains nothing from more; the CI box has 2 cores
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "sdtorch", "serve", "--host", "127.0.0.1", "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(url):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:]
                pytest.fail(f"`sdtorch serve` did not come up on {url} (exit code {process.poll()}):\n{tail}")
            time.sleep(0.25)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium under Playwright: a missing browser is a failure with the fix, not a skip."""
    if not CHROMIUM.exists():
        pytest.fail(f"Chromium is not installed at {CHROMIUM}: the browser tests need it. Run `bash scripts/setup.sh` "
                    "(or `apt-get install chromium chromium-driver`); never `playwright install`.")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the Python package playwright is missing: `.venv/bin/pip install -e '.[test]'` "
                    "(or `bash scripts/setup.sh`)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    """A fresh page at `/`, with its sampler and model lists loaded; JavaScript errors fail the test."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.set_default_timeout(JOB_TIMEOUT)
    page.goto(server)
    page.wait_for_selector("body[data-state=idle]")
    assert page.locator("#error").is_hidden(), page.inner_text("#error")
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


# ---- helpers ---------------------------------------------------------------------------------------------


def _results(page) -> int:
    return page.locator(".result").count()


def _wait_done(page, before: int) -> None:
    """Wait for the job to end (the page is idle again) and for its pictures; fail with the page's error if any."""
    page.wait_for_function(f"document.body.dataset.state === 'idle' && "
                           f"(document.querySelectorAll('.result').length > {before} || "
                           f"!document.getElementById('error').hidden)", timeout=JOB_TIMEOUT)
    assert page.locator("#error").is_hidden(), f"the page shows an error: {page.inner_text('#error')}"


def _generate(page, trigger=None) -> None:
    before = _results(page)
    (trigger or (lambda: page.click("#generate")))()
    _wait_done(page, before)


def _decode(url_or_b64: str) -> Image.Image:
    data = url_or_b64.split(",", 1)[1] if url_or_b64.startswith("data:") else url_or_b64
    return Image.open(io.BytesIO(base64.b64decode(data)))


def _scene(path: Path) -> Path:
    """A 64x64 picture with detail everywhere (stripes, a square): pixels that stay must be visibly kept."""
    image = Image.new("RGB", (64, 64), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    for x in range(0, 64, 8):
        draw.rectangle([x, 0, x + 3, 63], fill=(40 + 3 * x, 90, 200 - 2 * x))
    draw.rectangle([20, 20, 44, 44], fill=(220, 40, 40))
    image.save(path)
    return path


def _png_with_parameters(path: Path, text: str) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (64, 64), (90, 90, 90)).save(path, pnginfo=info)
    return path


def _drag(page, selector: str, points: list[tuple[float, float]]) -> None:
    """A mouse stroke over an element through `points` given as fractions of its width and height."""
    box = page.locator(selector).bounding_box()
    xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*xy[0])
    page.mouse.down()
    for x, y in xy[1:]:
        page.mouse.move(x, y, steps=4)
    page.mouse.up()


def _drop_file(page, selector: str, path: Path, mime: str = "image/png") -> None:
    """Drop a file on an element, as a user dragging it from the desktop does."""
    payload = base64.b64encode(path.read_bytes()).decode()
    transfer = page.evaluate_handle(
        """([data, name, type]) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type}));
            return transfer;
        }""", [payload, path.name, mime])
    page.dispatch_event(selector, "dragover", {"dataTransfer": transfer})
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


# ---- the tests -------------------------------------------------------------------------------------------


def test_generate_shows_progress_preview_and_parameters(page, tmp_path):
    page.fill("#prompt", "a large blue circle in the center")
    page.fill("#steps", "60")  # long enough for the progress bar to be seen between 0 and 1
    page.fill("#seed", "1234")
    before = _results(page)
    page.click("#generate")
    assert page.get_attribute("body", "data-state") == "busy"
    assert page.is_enabled("#interrupt") and page.is_disabled("#generate")
    page.wait_for_function("(v => v > 0 && v < 1)(document.getElementById('progress').value)")
    _wait_done(page, before)
    assert float(page.get_attribute("#progress", "data-max-seen")) > 0
    assert page.get_attribute("#preview", "src"), "no live preview (progress current_image) was shown"
    assert page.inner_text("#progress-text").startswith("done")
    shot = tmp_path / "web-page.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("SDTORCH_WEB_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["SDTORCH_WEB_SCREENSHOT"])

    card = page.locator(".result").first
    params = card.locator(".result-params").inner_text()
    assert params.startswith("a large blue circle in the center\n"), params
    for part in ("Steps: 60", "Seed: 1234", "Size: 64x64", "Sampler: DPM++ 2M"):
        assert part in params, params
    assert card.get_attribute("data-seed") == "1234"
    width = card.locator(".result-image").evaluate("img => img.naturalWidth")
    assert width == 64
    link = card.locator(".result-download")
    assert link.get_attribute("download").endswith("-1234.png")
    picture = _decode(link.get_attribute("href"))  # what "Download" saves: a PNG carrying its parameters
    assert picture.size == (64, 64) and picture.info["parameters"] == params

    page.click("#seed-random")
    assert page.input_value("#seed") == "-1"
    page.click("#seed-reuse")
    assert page.input_value("#seed") == "1234"

    page.fill("#prompt", "something else")
    page.fill("#steps", "3")
    card.locator(".use-settings").click()  # the result's settings back into the form
    assert page.input_value("#prompt") == "a large blue circle in the center"
    assert page.input_value("#steps") == "60"

    card.locator(".send-to-img2img").click()
    page.wait_for_selector("#canvas-box:not([hidden])")
    assert page.get_attribute("body", "data-mode") == "img2img"
    assert page.locator("#enable-hr").is_disabled()


def test_ctrl_enter_generates_a_batch(page):
    page.fill("#prompt", "a small green square in the bottom right")
    page.fill("#steps", "4")
    page.fill("#batch-size", "2")
    page.fill("#seed", "77")
    page.select_option("#sampler", "Euler a")
    _generate(page, lambda: page.press("#prompt", "Control+Enter"))
    assert _results(page) == 2
    seeds = [c.get_attribute("data-seed") for c in page.locator(".result").all()]
    assert seeds == ["77", "78"]  # image i of a batch uses seed + i
    assert "Sampler: Euler a" in page.locator(".result-params").first.inner_text()


def test_hires_fix_doubles_the_size(page):
    page.fill("#prompt", "a red star")
    page.fill("#steps", "4")
    page.click("#hires-section summary")
    page.check("#enable-hr")
    page.fill("#hr-scale", "2")
    page.fill("#hr-steps", "3")
    page.fill("#hr-denoise", "0.5")
    options = page.locator("#hr-upscaler option").all_inner_texts()  # the server's latent modes, then its upscalers
    assert options[0] == "Latent" and options[-3:] == ["None", "Lanczos", "Nearest"], options
    page.select_option("#hr-upscaler", "Nearest")
    page.select_option("#hr-sampler", "Euler")
    page.check("#tiling")
    with page.expect_request("**/sdapi/v1/txt2img") as request:
        _generate(page)
    body = request.value.post_data_json
    assert body["enable_hr"] is True and body["hr_scale"] == 2 and body["hr_second_pass_steps"] == 3
    assert (body["hr_upscaler"], body["hr_sampler_name"], body["tiling"]) == ("Nearest", "Euler", True)
    assert body["denoising_strength"] == 0.5
    card = page.locator(".result").first
    assert card.locator(".result-image").evaluate("img => img.naturalWidth") == 128
    params = card.locator(".result-params").inner_text()
    assert "Hires upscale: 2" in params and "Size: 64x64" in params, params
    assert "Hires sampler: Euler" in params and "Tiling: True" in params, params


def test_model_picker_lists_models_and_switches_by_title(page, server):
    import json

    with urllib.request.urlopen(server + "sdapi/v1/sd-models") as response:
        models = json.load(response)
    with urllib.request.urlopen(server + "sdapi/v1/options") as response:
        current = json.load(response)["sd_model_checkpoint"]
    titles = page.eval_on_selector("#model", "s => [...s.options].map(o => o.value)")
    assert titles == [m["title"] for m in models]
    assert page.input_value("#model") in {m["title"] for m in models if current in (m["title"], m["model_name"])}
    with page.expect_request(lambda r: r.url.endswith("sdapi/v1/options") and r.method == "POST") as request:
        page.select_option("#model", models[0]["title"])
    assert request.value.post_data_json == {"sd_model_checkpoint": models[0]["title"]}
    assert request.value.response().ok
    page.wait_for_function("!document.getElementById('model').disabled")
    assert page.locator("#error").is_hidden(), page.inner_text("#error")


def test_img2img_from_an_uploaded_file(page, tmp_path):
    scene = _scene(tmp_path / "scene.png")
    page.click("#img2img-section summary")
    page.set_input_files("#init-file", str(scene))
    page.wait_for_selector("#canvas-box:not([hidden])")
    assert page.get_attribute("body", "data-mode") == "img2img"
    page.fill("#denoising-strength", "0.5")
    page.fill("#prompt", "a red square")
    page.fill("#steps", "8")
    with page.expect_request("**/sdapi/v1/img2img") as request:
        _generate(page)
    body = request.value.post_data_json
    assert "mask" not in body and body["denoising_strength"] == 0.5
    assert np.array_equal(np.asarray(_decode(body["init_images"][0]).convert("RGB")),
                          np.asarray(Image.open(scene).convert("RGB")))  # the file's own pixels, not a re-encoding
    params = page.locator(".result-params").first.inner_text()
    assert "Denoising strength: 0.5" in params, params


def test_inpainting_changes_only_the_painted_area(page, tmp_path):
    from sdtorch.images import load_mask

    scene = _scene(tmp_path / "scene.png")
    page.click("#img2img-section summary")
    _drop_file(page, "#init-drop", scene)  # dropped on the img2img box: the init image
    page.wait_for_selector("#canvas-box:not([hidden])")
    page.fill("#brush-size", "10")
    page.dispatch_event("#brush-size", "input")

    # eraser and clear: paint, erase it all, paint again, clear
    _drag(page, "#mask-canvas", [(0.1, 0.1), (0.2, 0.1)])
    assert page.get_attribute("body", "data-mode") == "inpaint"
    page.check("#eraser")
    page.fill("#brush-size", "40")
    page.dispatch_event("#brush-size", "input")
    _drag(page, "#mask-canvas", [(0.05, 0.1), (0.25, 0.1)])
    assert page.get_attribute("body", "data-mode") == "img2img"
    page.uncheck("#eraser")
    _drag(page, "#mask-canvas", [(0.5, 0.5), (0.6, 0.6)])
    page.click("#mask-clear")
    assert page.get_attribute("body", "data-mode") == "img2img"

    # the real stroke: a band across the middle-left, with a 10 px brush
    page.fill("#brush-size", "10")
    page.dispatch_event("#brush-size", "input")
    _drag(page, "#mask-canvas", [(0.25, 0.45), (0.45, 0.45), (0.45, 0.6)])
    assert page.get_attribute("body", "data-mode") == "inpaint"
    page.fill("#prompt", "a yellow circle")
    page.fill("#steps", "10")
    page.fill("#denoising-strength", "1")
    page.fill("#mask-blur", "2")
    with page.expect_request("**/sdapi/v1/img2img") as request:
        _generate(page)
    body = request.value.post_data_json

    sent = _decode(body["mask"]).convert("L")
    assert sent.size == (64, 64)
    values = np.asarray(sent)
    assert values[int(0.45 * 64), int(0.35 * 64)] == 255 and values[2, 2] == 0 and values[60, 60] == 0  # white = repaint
    painted = values > 127
    assert 100 < painted.sum() < 64 * 64 // 3, painted.sum()
    assert body["mask_blur"] == 2

    original = np.asarray(Image.open(scene).convert("RGB")).astype(int)
    result = np.asarray(_decode(page.locator(".result-download").first.get_attribute("href")).convert("RGB")).astype(int)
    repaint = np.asarray(load_mask(sent, 64, 64, blur=2))  # the server's mask after its blur: 0 = kept exactly
    kept = repaint == 0
    assert kept.sum() > 64 * 64 // 2
    outside = np.abs(result - original)[kept]
    assert outside.max() <= 2, f"pixels outside the mask changed by up to {outside.max()}"
    inside = np.abs(result - original)[painted].mean()
    assert inside > 10, f"the painted area barely changed (mean difference {inside:.1f})"


def test_interrupt_stops_a_long_job(page):
    page.fill("#prompt", "a purple diamond")
    page.fill("#steps", "150")
    page.fill("#batch-size", "8")  # 150 steps x 8 images: far longer than the few seconds allowed below
    before = _results(page)
    started = time.monotonic()
    page.click("#generate")
    page.wait_for_function("Number(document.getElementById('progress').dataset.maxSeen) > 0")
    at = float(page.get_attribute("#progress", "data-max-seen"))
    clicked = time.monotonic()
    page.click("#interrupt")
    page.wait_for_function("document.body.dataset.state === 'idle'", timeout=30_000)
    stopped = time.monotonic() - clicked
    ran = clicked - started
    assert page.inner_text("#progress-text").startswith("interrupted"), page.inner_text("#progress-text")
    end = float(page.get_attribute("#progress", "data-max-seen"))
    message = f"{stopped:.1f} s to stop, interrupted after {ran:.1f} s at {at:.0%} of the job, got to {end:.0%}"
    assert at < 0.5 and end < 0.9 and stopped < 10, message

    # the server takes the next job as usual
    page.fill("#steps", "3")
    page.fill("#batch-size", "1")
    clicked = time.monotonic()
    _generate(page)
    assert time.monotonic() - clicked < 10, "the next job waited: the interrupted one went on running"
    assert _results(page) > before
    assert page.inner_text("#progress-text").startswith("done")


def test_a_queued_job_says_so_until_its_turn(page, server):
    import json
    import threading

    def post(path: str, body: dict) -> dict:
        request = urllib.request.Request(server + "sdapi/v1/" + path, json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.load(response)

    other = threading.Thread(target=post, args=("txt2img", {"prompt": "a long job", "steps": 150, "batch_size": 8,
                                                            "force_task_id": "another-client"}))
    other.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until the other client's job runs
            with urllib.request.urlopen(server + "sdapi/v1/progress?skip_current_image=true") as response:
                if json.load(response)["queue"]["current"] == "another-client":
                    break
            time.sleep(0.1)
        page.fill("#prompt", "a small cross")
        page.fill("#steps", "3")
        before = _results(page)
        page.click("#generate")
        page.wait_for_function("document.getElementById('progress-text').textContent.startsWith('queued')")
        assert page.eval_on_selector("#progress", "bar => bar.value") == 0  # the other job's progress is not shown
    finally:
        post("interrupt", {})  # stops the other client's job: ours runs next
        other.join()
    _wait_done(page, before)
    assert "a small cross" in page.locator(".result-params").first.inner_text()


def test_a_dropped_png_fills_the_form(page, tmp_path):
    text = ('a small red star in the top left\n"a second line", with commas\n'
            "Negative prompt: blurry, green\n"
            "Steps: 7, Sampler: Euler a, Schedule type: Karras, CFG scale: 3.5, Seed: 4242, Size: 64x48, "
            'Model hash: 0123456789, Model: shapes, Lora hashes: "a: 1, b: 2", Tiling: True, Version: sdtorch')
    dropped = _png_with_parameters(tmp_path / "dropped.png", text)
    _drop_file(page, "#prompt", dropped)  # anywhere but the img2img box: read its parameters
    page.wait_for_function("document.getElementById('png-info-text').textContent.length > 0")
    assert page.input_value("#prompt") == 'a small red star in the top left\n"a second line", with commas'
    assert page.input_value("#negative-prompt") == "blurry, green"
    assert page.input_value("#steps") == "7"
    assert page.input_value("#sampler") == "Euler a"
    assert page.input_value("#scheduler").lower() == "karras"
    assert page.input_value("#cfg-scale") == "3.5"
    assert page.input_value("#seed") == "4242"
    assert (page.input_value("#width"), page.input_value("#height")) == ("64", "48")
    assert page.is_checked("#tiling")
    assert page.get_attribute("body", "data-mode") == "txt2img"  # the drop did not become an init image

    # an upload, in the old A1111 spelling (the schedule inside the sampler's name), no negative prompt
    old = _png_with_parameters(tmp_path / "old.png", "a blue cross\nSteps: 12, Sampler: DPM++ 2M Karras, "
                                                     "CFG scale: 6, Seed: 9, Size: 64x64, Model hash: abc")
    page.set_input_files("#png-info-file", str(old))
    page.wait_for_function("document.getElementById('prompt').value === 'a blue cross'")
    assert page.input_value("#negative-prompt") == ""
    assert page.input_value("#sampler") == "DPM++ 2M" and page.input_value("#scheduler").lower() == "karras"
    assert (page.input_value("#steps"), page.input_value("#cfg-scale"), page.input_value("#seed")) == ("12", "6", "9")
    assert not page.is_checked("#tiling")
    assert page.locator("#error").is_hidden(), page.inner_text("#error")
