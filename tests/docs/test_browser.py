"""The built site as a reader sees it: headless Chromium opens the home page, a guide and an API page over HTTP and
checks that they render, with their images loaded, their code blocks highlighted and the theme's style applied.

The browser is Debian's ``chromium`` with its ``chromium-driver`` (``.ci/run`` installs both). Screenshots go to
``$LIGHTNING_CLIP_DOCS_SCREENSHOTS`` when it is set (to look at), else to a temporary directory.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.docs.conftest import require

pytestmark = pytest.mark.docs
require("selenium")

#: Set by ``.ci/run`` (with the reason) when it could not install a browser; the tests then skip saying why.
NO_BROWSER_ENV = "LIGHTNING_CLIP_NO_BROWSER"
SCREENSHOTS_ENV = "LIGHTNING_CLIP_DOCS_SCREENSHOTS"

# page: (path in the site, an image it must show, an element id the page must hold)
PAGES = {
    "home": ("", "assets/demo_gradient_norms.png", "install-and-run"),
    "guide": ("guides/ddp-arc/", "benchmarks/results/robustness.png", "worker-momentum-robust-d-shb"),
    "api": ("reference/callbacks/", None, "lightning_clip.callbacks.clipping.GradientClipping"),
}


def _executables() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    reason = os.environ.get(NO_BROWSER_ENV)
    missing = "chromium" if not browser else "chromedriver"
    if reason or not os.environ.get("CI"):
        pytest.skip(f"no {missing} on PATH ({reason or 'apt-get install chromium chromium-driver'})")
    pytest.fail(f"no {missing} on PATH, and .ci/run did not say why ({NO_BROWSER_ENV} is not set)")


@pytest.fixture(scope="module")
def server(site: Path) -> Iterator[str]:
    """The site served over HTTP on the loopback interface (as a reader's browser would get it, not file://)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    binary, driver_path = _executables()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1400", "--hide-scrollbars"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    given = os.environ.get(SCREENSHOTS_ENV)
    path = Path(given) if given else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


# Run in the page once it has loaded: what a reader would see, as plain values.
RENDERED = """
const article = document.querySelector("article.md-content__inner");
const images = Array.from(document.querySelectorAll("article img")).map(img => ({
    src: img.currentSrc || img.src, complete: img.complete, width: img.naturalWidth,
    shown: img.getBoundingClientRect().width}));
const blocks = Array.from(document.querySelectorAll("article pre > code"));
const header = document.querySelector("header.md-header");
return {
    title: document.title,
    article: article ? article.innerText.length : 0,
    images: images,
    code_blocks: blocks.length,
    highlighted: blocks.filter(code => code.querySelector("span[class]")).length,
    header_color: header ? getComputedStyle(header).backgroundColor : null,
    nav_links: document.querySelectorAll("nav.md-nav a.md-nav__link").length,
    api_objects: document.querySelectorAll("div.doc-object").length,
    signatures: document.querySelectorAll("div.doc-signature pre code, .doc-signature code").length,
};
"""


def _open(browser: Any, url: str, screenshot: Path, anchor: str, image: str | None) -> dict[str, Any]:
    browser.get(url)
    found = browser.execute_script("return document.getElementById(arguments[0]) !== null", anchor)
    assert found, f"{url} has no element #{anchor}"
    # The load event has fired; an image still loading (one marked lazy) is waited for, and its outcome read.
    browser.set_script_timeout(30)
    browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "Promise.all(Array.from(document.querySelectorAll('article img')).map(img => img.complete ? null :"
        " new Promise(ok => { img.onload = img.onerror = ok; }))).then(() => done(null));")
    rendered = browser.execute_script(RENDERED)
    if image is not None:  # the screenshot shows the image the page must show
        browser.execute_script("const img = document.querySelector(`article img[src$='${arguments[0]}']`);"
                               "if (img) img.scrollIntoView({block: 'center'});", image.rsplit("/", 1)[-1])
    assert browser.save_screenshot(str(screenshot)), f"no screenshot of {url}"
    return rendered


def _severe(browser: Any) -> list[str]:
    return [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


@pytest.mark.parametrize("page", list(PAGES))
def test_a_page_renders_with_its_images_and_code_blocks(page, server, browser, screenshots):
    path, image, anchor = PAGES[page]
    browser.get_log("browser")  # drop what earlier pages logged
    rendered = _open(browser, server + path, screenshots / f"{page}.png", anchor, image)
    where = server + path
    assert "lightning_clip" in rendered["title"], (where, rendered["title"])
    assert rendered["article"] > 500, f"{where}: the article holds {rendered['article']} characters"
    # The theme's stylesheet applied: the header is coloured, the navigation is there.
    assert rendered["header_color"] not in (None, "rgba(0, 0, 0, 0)", "transparent"), rendered["header_color"]
    assert rendered["nav_links"] > 20, f"{where}: {rendered['nav_links']} navigation links"
    for img in rendered["images"]:
        assert img["complete"] and img["width"] > 0, f"{where}: the image {img['src']} did not load"
    if image is not None:
        shown = [img for img in rendered["images"] if img["src"] == server + image]
        assert shown and shown[0]["shown"] > 300, f"{where}: {image} is not shown ({rendered['images']})"
    assert rendered["code_blocks"] >= 2, f"{where}: {rendered['code_blocks']} code blocks"
    assert rendered["highlighted"] >= 1, f"{where}: no code block is highlighted"
    if page == "api":
        assert rendered["api_objects"] >= 9, f"{where}: {rendered['api_objects']} documented objects"
        assert rendered["signatures"] >= 9, f"{where}: {rendered['signatures']} signatures"
    assert not _severe(browser), f"{where}: the browser reported errors: {_severe(browser)}"
