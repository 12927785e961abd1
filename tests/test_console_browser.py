"""The ``/ui`` console in a real headless Chromium, against the real app on a tiny model.

The app runs in-process under uvicorn on a free loopback port; Selenium drives Debian's
``chromium`` through ``chromedriver``. Skipped when either binary or selenium is missing.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.routing import NoMatchFound
from tiny import MEMORY_TEXTS, make_model, make_tokenizer

from tpatcher import Patcher
from tpatcher.server import EditStore, create_app

try:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.chrome.service import Service as ChromeService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - depends on the environment
    webdriver = None

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    webdriver is None or CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs selenium, chromium and chromedriver",
)

API_TOKEN = "reader-token"
EDIT_TOKEN = "writer-token"
SCREENSHOT = Path("/tmp/console.png")
# Untrusted text: must show up literally, never as markup.
PROMPT = 'the capital of france is <img src="x" class="xss"> <b>bold</b>'
TARGET = "berlin"
CHROME_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,1100",
]


@dataclass
class LiveServer:
    """The app served by uvicorn in a thread."""

    url: str
    routes: set[str]  # the API's paths, as in its OpenAPI schema

    def edits(self) -> dict[str, dict[str, Any]]:
        """The server's own listing (``GET /v1/edits``), by edit id."""
        auth = {"Authorization": f"Bearer {API_TOKEN}"}
        response = httpx.get(f"{self.url}/v1/edits", headers=auth, timeout=30)
        response.raise_for_status()
        return {edit["id"]: edit for edit in response.json()["data"]}


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[LiveServer]:
    import uvicorn

    patcher = Patcher(make_model("llama"), make_tokenizer("llama"), memory_texts=MEMORY_TEXTS)
    store = EditStore(tmp_path / "store")
    store.open(patcher, store.check())
    app = create_app(patcher, store, edit_token=EDIT_TOKEN, api_token=API_TOKEN, model_name="tiny")
    try:
        app.url_path_for("console_page")
    except NoMatchFound:  # create_app does not include the console (yet)
        from tpatcher.server.console import router

        app.include_router(router)
    routes = set(app.openapi()["paths"])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", routes)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in CHROME_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=ChromeService(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: WebDriver, what: str, check: Callable[[], Any], timeout: float = 30) -> Any:
    """Wait until ``check()`` is truthy; fail with ``what`` and the page's messages."""

    def messages() -> str:
        ids = ("status-text", "edit-message", "compare-message", "edits-message")
        return "; ".join(f"{i}={driver.find_element(By.ID, i).text!r}" for i in ids)

    try:
        wait = WebDriverWait(
            driver, timeout, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException]
        )
        return wait.until(lambda _: check())
    except TimeoutException as exc:
        raise AssertionError(f"timed out waiting for {what}: {messages()}") from exc


def row_ids(driver: WebDriver) -> list[str]:
    """The edit ids the table shows, read in one go (the table is re-rendered by polling)."""
    script = "return [...document.querySelectorAll('#edits-body tr')].map(r => r.dataset.editId)"
    return driver.execute_script(script)


def row(driver: WebDriver, edit_id: str) -> Any:
    """The table row of one edit."""
    return driver.find_element(By.CSS_SELECTOR, f'#edits-body tr[data-edit-id="{edit_id}"]')


def fill(driver: WebDriver, element_id: str, text: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(text)


def test_console_edits_compares_and_rolls_back(live_server: LiveServer, browser: Any) -> None:
    url = live_server.url
    page = httpx.get(f"{url}/ui")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text  # no external assets
    assert httpx.get(f"{url}/ui/static/console.js").status_code == 200
    assert httpx.get(f"{url}/ui/static/console.py").status_code == 404  # only listed files
    assert httpx.get(f"{url}/ui/").headers["location"] == "../ui"

    browser.get(f"{url}/ui")
    status = browser.find_element(By.ID, "status")
    # an API token is configured and the tab has none yet: the listing is refused
    wait_for(browser, "the locked status", lambda: status.get_attribute("data-live") == "locked")

    fill(browser, "api-token", API_TOKEN)
    fill(browser, "edit-token", EDIT_TOKEN)
    browser.find_element(By.ID, "save-tokens").click()
    wait_for(browser, "the live status", lambda: status.get_attribute("data-live") == "live")
    assert browser.find_element(By.ID, "edits-empty").is_displayed()
    stored = browser.execute_script("return sessionStorage.getItem('tpatcher.editToken')")
    assert stored == EDIT_TOKEN

    # a new edit through the page
    fill(browser, "edit-prompt", PROMPT)
    fill(browser, "edit-target", TARGET)
    browser.find_element(By.ID, "edit-submit").click()
    wait_for(browser, "the new edit's row", lambda: len(row_ids(browser)) == 1, timeout=120)
    (edit_id,) = listed = live_server.edits()
    cells = row(browser, edit_id).find_elements(By.TAG_NAME, "td")
    assert cells[0].text == PROMPT and cells[1].text == TARGET
    assert cells[2].text.startswith("20")  # the local date and time it was made
    assert int(cells[3].text) == listed[edit_id]["neurons"] >= 1
    assert "Applied edit" in browser.find_element(By.ID, "edit-message").text
    assert not browser.find_elements(By.CSS_SELECTOR, "#edits-body img, #edits-body b")

    # the prompt with and without the patch (the edit prefilled it)
    assert browser.find_element(By.ID, "compare-prompt").get_attribute("value") == PROMPT
    fill(browser, "compare-max-tokens", "3")
    browser.find_element(By.ID, "compare-submit").click()
    result = browser.find_element(By.ID, "compare-result")
    state = wait_for(
        browser,
        "the compare answer",
        lambda: (
            result.get_attribute("data-state") in ("done", "partial", "error")
            and result.get_attribute("data-state")
        ),
        timeout=60,
    )
    patched = browser.find_element(By.ID, "compare-patched").text
    base = browser.find_element(By.ID, "compare-base").text
    assert patched.split()[:1] == [TARGET]
    if "/v1/compare" in live_server.routes:
        assert state == "done" and base.split()[:1] != [TARGET]
    else:  # the endpoint is not there yet: the page shows the patched answer alone
        assert state == "partial", browser.find_element(By.ID, "compare-message").text

    # polling: an edit made elsewhere shows up without touching the page
    other = httpx.post(
        f"{url}/v1/edits",
        json={"prompt": "the capital of italy is", "target": "tokyo"},
        headers={"Authorization": f"Bearer {EDIT_TOKEN}"},
        timeout=120,
    )
    assert other.status_code == 201, other.text
    other_id = other.json()["id"]
    wait_for(browser, "the polled edit", lambda: other_id in row_ids(browser), timeout=15)
    browser.save_screenshot(str(SCREENSHOT))

    # roll the first edit back through the page: one click arms, the second confirms
    rollback = "[data-action=rollback]"
    row(browser, edit_id).find_element(By.CSS_SELECTOR, rollback).click()
    button = row(browser, edit_id).find_element(By.CSS_SELECTOR, rollback)
    assert button.get_attribute("data-armed") == "true"
    button.click()
    wait_for(browser, "the rolled-back edit to go", lambda: edit_id not in row_ids(browser))
    assert set(live_server.edits()) == {other_id}
    assert row_ids(browser) == [other_id]
    assert f"Rolled back edit {edit_id}" in browser.find_element(By.ID, "edits-message").text

    assert EDIT_TOKEN not in browser.current_url and API_TOKEN not in browser.current_url
    logs = browser.get_log("browser")
    # no script errors and no CSP violations; refused requests (the first 401) are expected
    bad = [
        e
        for e in logs
        if e["level"] == "SEVERE"
        and "Failed to load resource" not in e["message"]
        or "Content Security Policy" in e["message"]
    ]
    assert not bad, bad
