"""The app in a real browser: Playwright (PyPI) driving Debian's chromium fills a prompt, clicks
generate and waits for the gallery image on the SoftPAG and UAM tabs (and runs the A-STAR and
HeadHunter tabs), taking a screenshot of every tab.

Chromium: ``/usr/bin/chromium`` (or ``DIFFATTN_CHROMIUM``); when absent, the setup runs
``apt-get install -y chromium`` (as root, with a timeout) and the test skips, saying why, when it
cannot. No ``playwright install`` download is needed. Screenshots go to the test's temp folder,
or to ``docs/app-<tab>.png`` with ``DIFFATTN_SCREENSHOTS=1`` (how the README's are made)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_MS = 90_000  # any one wait; the whole test is bounded by pytest-timeout below
CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/lib/chromium/chromium")


def _chromium() -> str:
    env = os.environ.get("DIFFATTN_CHROMIUM")
    if env:
        if not os.access(env, os.X_OK):
            pytest.skip(f"DIFFATTN_CHROMIUM={env} is not an executable")
        return env
    for path in CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium is not installed and cannot be (needs apt-get as root): apt-get install chromium")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        for cmd in (["apt-get", "install", "-y", "chromium"], ["apt-get", "update"],
                    ["apt-get", "install", "-y", "chromium"]):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if cmd[1] == "install" and done.returncode == 0:
                break
    except (subprocess.TimeoutExpired, OSError) as e:
        pytest.skip(f"chromium is not installed and `apt-get install chromium` failed: {e}")
    for path in CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    pytest.skip(f"chromium is not installed and `apt-get install chromium` failed: {done.stderr.strip()[-300:]}")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    executable = _chromium()
    try:
        pw = sync_api.sync_playwright().start()
    except Exception as e:  # the driver shipped in the wheel cannot start here
        pytest.skip(f"the playwright driver cannot start: {e}")
    try:
        b = pw.chromium.launch(executable_path=executable, headless=True, timeout=TIMEOUT_MS,
                               args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
    except Exception as e:
        pw.stop()
        pytest.skip(f"{executable} does not start under playwright: {str(e).splitlines()[0]}")
    yield b
    b.close()
    pw.stop()


@pytest.fixture(scope="module")
def app_url():
    from diffattn.app.core import AppContext
    from diffattn.app.launcher import launch
    from diffattn.app.serving import PipelinePool

    ctx = AppContext(pool=PipelinePool(1))
    for name in ("tiny-sd3", "tiny-sd"):
        ctx.pool.model(name)  # loaded before the browser's clock starts
    demo, url = launch(ctx, port=0, block=False, quiet=True)
    yield url
    demo.close()


def _shots() -> Path | None:
    return ROOT / "docs" if os.environ.get("DIFFATTN_SCREENSHOTS") == "1" else None


def _screenshot(page, name: str, tmp_path: Path) -> Path:
    """A small PNG of the page (palette-quantised)."""
    from PIL import Image

    folder = _shots() or tmp_path
    folder.mkdir(exist_ok=True)
    path = folder / f"app-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    with Image.open(path) as im:
        small = im.convert("RGB")
    small.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


def _open_tab(page, label: str):
    page.get_by_role("tab", name=label).click()


def _wait_image(page, selector: str):
    img = page.locator(f"{selector} img").first
    img.wait_for(state="visible", timeout=TIMEOUT_MS)
    page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=img.element_handle(), timeout=TIMEOUT_MS)
    return img


@pytest.mark.timeout(600)
def test_browser_every_tab(browser, app_url, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(app_url, wait_until="domcontentloaded")
    page.get_by_role("tab", name="SoftPAG").wait_for()

    # SoftPAG: a prompt, Generate, the gallery's images
    _open_tab(page, "SoftPAG")
    prompt = page.locator("#tab-softpag .prompt textarea").first
    prompt.fill("a green triangle above a yellow circle")
    page.locator("#softpag-generate").click()
    _wait_image(page, "#softpag-gallery")
    _wait_image(page, "#softpag-heads")
    assert page.locator("#softpag-gallery img").count() >= 2
    assert "SoftPAG" in page.locator("#softpag-info").inner_text()
    _screenshot(page, "softpag", tmp_path)

    # UAM: a testbed sample image (its caption fills the source prompt), a target, reconstruct
    _open_tab(page, "UAM inversion + editing")
    page.locator("#uam-sample").click()
    page.locator("#uam-image img").first.wait_for(state="visible")
    page.wait_for_function("() => document.querySelector('#uam-source textarea').value.length > 0")
    source = page.locator("#uam-source textarea").input_value()
    page.locator("#uam-source textarea").fill(source)
    page.locator("#uam-reconstruct").click()
    _wait_image(page, "#uam-gallery")
    page.wait_for_function("() => document.querySelectorAll('#uam-gallery img').length >= 4")
    assert "PSNR" in page.locator("#tab-uam").inner_text()
    _screenshot(page, "uam", tmp_path)

    # A-STAR: its concepts come from the prompt; Generate; images and concept maps
    _open_tab(page, "A-STAR")
    page.locator("#astar-generate").click()
    _wait_image(page, "#astar-gallery")
    _wait_image(page, "#astar-maps")
    _screenshot(page, "astar", tmp_path)

    # HeadHunter: the default small search; its heat map
    _open_tab(page, "HeadHunter")
    page.locator("#headhunt-run").click()
    _wait_image(page, "#headhunt-heatmap")
    _screenshot(page, "headhunt", tmp_path)

    assert not errors, errors
    page.close()
