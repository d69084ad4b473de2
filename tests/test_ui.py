"""The slider page, served on a free local port and driven in a real headless Chromium (Debian's ``chromium``,
through Playwright): load, move a slider, generate, see the images change; two pages at once; a bad value."""

from __future__ import annotations

import shutil
from urllib.parse import urljoin

import pytest

gradio = pytest.importorskip("gradio", reason="the page needs the ui extra: pip install -e '.[ui]'")
playwright = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (test extra)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium: apt-get install -y chromium"),
]
#: seconds to wait for a generation (a few on two CPU cores)
WAIT_MS = 120_000


@pytest.fixture(scope="module")
def server():
    from diffusion_blend.ui import digits_page, free_port, serve

    port = free_port()
    app = serve(digits_page(), port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(url)
    page.wait_for_selector("#generate")
    return page


def set_slider(page, name: str, value: float) -> None:
    box = page.locator(f"#weight-{name} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def generate(page, expect: str) -> list[bytes]:
    """Press Generate, wait until the status line says ``expect`` and the images are there; return their files."""
    page.click("#generate")
    page.wait_for_function(
        "(text) => document.querySelector('#status').innerText.includes(text)", arg=expect, timeout=WAIT_MS
    )
    page.wait_for_selector("#gallery img", timeout=WAIT_MS)
    return gallery_files(page)


def gallery_files(page) -> list[bytes]:
    """The gallery's image files, as the page received them."""
    sources = [image.get_attribute("src") for image in page.locator("#gallery img").all()]
    return [page.request.get(urljoin(page.url, source)).body() for source in sources]


def test_moving_a_slider_changes_the_images(server, browser, tmp_path):
    page = open_page(browser, server)
    before = generate(page, "bold = 0.333")
    for name, value in (("bold", 1), ("legible", 0), ("stencil", 0)):
        set_slider(page, name, value)
    after = generate(page, "bold = 1, legible = 0, stencil = 0")
    assert before != after
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert (tmp_path / "page.png").stat().st_size > 10_000
    page.close()


def test_the_same_seed_and_settings_give_the_same_images(server, browser):
    page = open_page(browser, server)
    first = generate(page, "seed 0")
    page.locator("#seed input").fill("1")
    page.locator("#seed input").press("Enter")
    other = generate(page, "seed 1")
    page.locator("#seed input").fill("0")
    page.locator("#seed input").press("Enter")
    again = generate(page, "seed 0")
    assert first == again and first != other
    page.close()


def test_two_pages_generating_at_once_both_get_their_images(server, browser):
    pages = [open_page(browser, server) for _ in range(2)]
    set_slider(pages[1], "bold", 0.9)
    for page in pages:
        page.click("#generate")
    for page, expect in zip(pages, ("bold = 0.333", "bold = 0.9")):
        page.wait_for_function(
            "(text) => document.querySelector('#status').innerText.includes(text)", arg=expect, timeout=WAIT_MS
        )
        assert page.locator("#gallery img").count() == 8
        page.close()


def test_a_bad_value_is_reported_on_the_page_and_the_server_keeps_serving(server, browser):
    page = open_page(browser, server)
    page.get_by_label("stochastic").check()
    set_slider(page, "bold", 0.9)  # 0.9 + 0.333 + 0.333: off the simplex the stochastic mode needs
    page.click("#generate")
    page.wait_for_function(
        "() => document.querySelector('#status').innerText.includes('Not generated')", timeout=WAIT_MS
    )
    assert "sum to 1" in page.inner_text("#status")
    page.get_by_label("mix").check()
    generate(page, "mix")
    page.close()


def test_the_page_is_refused_without_gradio_with_the_install_line(monkeypatch):
    import builtins

    from diffusion_blend import ui

    real_import = builtins.__import__

    def no_gradio(name, *args, **kwargs):
        if name == "gradio":
            raise ImportError("No module named 'gradio'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gradio)
    with pytest.raises(ImportError, match=r"pip install 'diffusion-blend\[ui\]'"):
        ui.require_gradio()
