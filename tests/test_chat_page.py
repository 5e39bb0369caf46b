"""The chat page in a real browser: Debian's Chromium driven headless by Selenium through Debian's
chromedriver, against `internvl-edge serve` started as a subprocess on 127.0.0.1 with a tiny generated
bundle. Answers are compared with `run --json` and the Python API on the same bundle; every test saves a
screenshot in its temporary folder (INTERNVL_EDGE_PAGE_SCREENSHOT=path also keeps the first test's)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
from test_server import KEY, LOOPBACK, cli_run_json
from test_video import write_video

from internvl_edge.api import load

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver (.ci/run installs them)"
    ),
]
WAIT_S = 60


@pytest.fixture(scope="module")
def page_bundle(bundle):
    # a long context, so that an unlimited answer runs for seconds and can be stopped half way
    return bundle("tiny_bf16", "w4bf16", seq_length=8192)


@contextmanager
def serve(bundle_path: str, *flags: str):
    """`internvl-edge serve` on a free loopback port; yields the page's base URL; always stopped."""
    argv = [sys.executable, "-m", "internvl_edge", "serve", "-m", bundle_path, "--host", LOOPBACK, "--port", "0"]
    proc = subprocess.Popen(
        [*argv, "--parallel", "2", *flags], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()
    try:
        deadline = time.monotonic() + WAIT_S
        while not any("serving " in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        url = next(line for line in lines if "serving " in line).split(" on ")[1].split()[0]
        yield url.removesuffix("/v1")
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def server(page_bundle):
    with serve(page_bundle) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # nothing may be downloaded: Debian's browser and driver
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1100,820",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser, tmp_path, request):
    """The browser with fresh logs and storage; the test's screenshot is saved when it ends."""
    browser.get("about:blank")
    browser.get_log("browser"), browser.get_log("performance")  # drop what earlier tests left
    yield browser
    browser.save_screenshot(str(tmp_path / f"{request.node.name}.png"))


def open_page(driver, url: str, path: str = "/", clear_storage: bool = True):
    driver.get(url + path)
    if clear_storage:
        driver.execute_script("localStorage.clear()")
        driver.get(url + path)
    wait(driver, lambda d: d.execute_script("return document.readyState") == "complete")


def wait(driver, condition, timeout: float = WAIT_S):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    waiting = WebDriverWait(driver, timeout, poll_frequency=0.05, ignored_exceptions=(StaleElementReferenceException,))
    return waiting.until(condition)


def by_id(driver, name: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, name)


def all_of(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def console_errors(driver, allowed: tuple[str, ...] = ()) -> list[str]:
    return [
        e["message"]
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE" and not any(a in e["message"] for a in allowed)
    ]


def requested_urls(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def settings(driver, **values) -> None:
    """Fill the settings panel (temperature, max_tokens, system prompt ...), opening it if needed."""
    if not by_id(driver, "settings").is_displayed():
        by_id(driver, "toggle-settings").click()
    ids = {"temperature": "temperature", "top_p": "top-p", "max_tokens": "max-tokens", "system": "system-prompt"}
    for key, value in values.items():
        field = by_id(driver, ids[key])
        field.clear()
        field.send_keys(str(value))


def ask(driver, text: str, files: tuple[str, ...] = (), done: bool = True):
    """Attach `files` through the file picker, type `text`, send; returns the answer's turn element (once
    finished, unless done=False)."""
    if files:
        before = len(all_of(driver, "#attachments .attachment"))
        by_id(driver, "file-input").send_keys("\n".join(files))
        wait(driver, lambda d: len(all_of(d, "#attachments .attachment")) == before + len(files))
    answers = len(all_of(driver, ".turn.assistant, .turn.error"))
    by_id(driver, "prompt").send_keys(text)
    by_id(driver, "send").click()

    def latest(d):
        found = all_of(d, ".turn.assistant, .turn.error")[answers:]
        return found[-1] if found else None

    if not done:
        return wait(driver, latest)

    def finished(d):  # an answer marked done, or the error turn that replaced it
        turn = latest(d)
        return turn if turn and (turn.get_attribute("data-done") or "error" in turn.get_attribute("class")) else None

    return wait(driver, finished)


def data_url(path: str, mime: str) -> str:
    with open(path, "rb") as f:
        return f"data:{mime};base64," + base64.b64encode(f.read()).decode()


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=10).json()


def test_a_question_with_an_image_streams_the_answer_of_run_json_and_turn_two_sends_both(
    page, server, page_bundle, images, tmp_path
):
    open_page(page, server)
    wait(page, lambda d: by_id(d, "model-name").text == os.path.basename(page_bundle))
    assert not by_id(page, "key-dialog").is_displayed()  # no key set: no key asked
    settings(page, temperature=0, max_tokens=12)
    first = ask(page, "Describe the image.", files=(images["square"],))
    expected = cli_run_json(
        page_bundle, "-p", "Describe the image.", "--image", images["square"], "--max-new-tokens", 12
    )
    assert first.get_attribute("data-raw") == expected["text"]
    stats = first.find_element("css selector", ".stats").text
    assert "12 tokens" in stats and "first token" in stats and "tokens/s" in stats, stats
    thumbs = all_of(page, ".turn.user .thumbs img")
    assert len(thumbs) == 1 and thumbs[0].get_attribute("src").startswith("data:image/png;base64,")
    # turn 2 is answered with turn 1 (its image and answer) in the prompt: the API's answer to both turns
    second = ask(page, "And its colour?")
    image = {"type": "image_url", "image_url": {"url": data_url(images["square"], "image/png")}}
    both = [
        {"role": "user", "content": [{"type": "text", "text": "Describe the image."}, image]},
        {"role": "assistant", "content": expected["text"]},
        {"role": "user", "content": [{"type": "text", "text": "And its colour?"}]},
    ]
    ref = load(page_bundle)
    assert second.get_attribute("data-raw") == ref.generate(messages=both, max_new_tokens=12).text
    assert second.get_attribute("data-raw") != ref.generate(messages=both[2:], max_new_tokens=12).text
    assert console_errors(page) == []
    if os.environ.get("INTERNVL_EDGE_PAGE_SCREENSHOT"):  # docs/chat-page.png is made this way
        by_id(page, "toggle-settings").click()
        page.save_screenshot(os.environ["INTERNVL_EDGE_PAGE_SCREENSHOT"])
        by_id(page, "toggle-settings").click()
    # an image that does not decode: the server's error, in words, in the conversation
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    error = ask(page, "What is this?", files=(str(broken),))
    assert "error" in error.get_attribute("class") and "not an image" in error.text, error.text
    assert console_errors(page, allowed=("status of 400",)) == []  # the browser's note of the refused request
    urls = requested_urls(page)
    assert any(u.startswith(server + "/static/chat.js") for u in urls)
    assert [u for u in urls if not u.startswith((server + "/", "data:", "blob:"))] == []  # no other host
    # /chat is the same page
    assert httpx.get(server + "/chat", timeout=10).text == httpx.get(server + "/", timeout=10).text


def test_the_page_is_served_with_a_strict_policy(server):
    r = httpx.get(server + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self';" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "http" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    for asset in ("/static/chat.js", "/static/chat.css"):
        assert httpx.get(server + asset, timeout=10).status_code == 200
    assert "innerHTML" not in httpx.get(server + "/static/chat.js", timeout=10).text


def test_stop_ends_a_long_answer_and_frees_the_sequence(page, server):
    open_page(page, server)
    settings(page, temperature=0, max_tokens="")
    turn = ask(page, "Write a long story.", done=False)
    wait(page, lambda d: len(turn.find_element("css selector", ".body").text) > 20)  # streaming
    steps = health(server)["decode_steps"]
    by_id(page, "stop").click()
    wait(page, lambda d: turn.get_attribute("data-done") == "stopped", timeout=10)
    deadline = time.monotonic() + 10
    while (h := health(server))["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert h["active"] == 0 and h["waiting"] == 0
    assert h["decode_steps"] - steps < 8000  # an 8192-token context: stopped far before its end
    time.sleep(0.3)
    assert health(server)["decode_steps"] == h["decode_steps"]  # nothing decodes any more
    assert "stopped" in turn.find_element("css selector", ".stats").text
    assert by_id(page, "send").is_displayed() and not by_id(page, "stop").is_displayed()
    settings(page, max_tokens=4)
    assert ask(page, "Hi").get_attribute("data-done") == "done"  # the conversation goes on
    assert console_errors(page) == []


def test_html_in_a_message_shows_as_text_and_runs_nothing(page, server):
    open_page(page, server)
    settings(page, temperature=0, max_tokens=4)
    attack = 'Look: <img src=x onerror="window.__pwned=1"> and <script>window.__pwned=2</script> **bold** `code`'
    answer = ask(page, attack)
    assert answer.get_attribute("data-done") == "done"
    user = all_of(page, ".turn.user .body")[-1]
    assert user.text == 'Look: <img src=x onerror="window.__pwned=1"> and <script>window.__pwned=2</script> bold code'
    assert page.execute_script("return window.__pwned === undefined")
    assert all_of(page, "#conversation img") == [] and all_of(page, "#conversation script") == []
    assert [e.text for e in all_of(page, ".turn.user strong")] == ["bold"]  # light markdown, as elements
    assert not any(u.endswith("/x") for u in requested_urls(page))
    assert console_errors(page) == []


def test_the_api_key_prompt(page, page_bundle):
    with serve(page_bundle, "--api-key", KEY) as url:
        open_page(page, url)
        dialog = by_id(page, "key-dialog")
        wait(page, lambda d: dialog.is_displayed())
        assert by_id(page, "key-error").text == ""  # asked, not scolded, on the first visit
        by_id(page, "api-key").send_keys("not-the-key")
        by_id(page, "key-submit").click()
        wait(page, lambda d: by_id(d, "key-error").text != "")
        message = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer not-the-key"}, timeout=10).json()
        assert by_id(page, "key-error").text == message["error"]["message"]  # the server's words
        assert dialog.is_displayed()
        by_id(page, "api-key").clear()
        by_id(page, "api-key").send_keys(KEY)
        by_id(page, "key-submit").click()
        wait(page, lambda d: not dialog.is_displayed())
        assert page.execute_script("return localStorage.getItem('internvl-edge.api-key')") == KEY
        settings(page, temperature=0, max_tokens=4)
        assert ask(page, "Hi").get_attribute("data-done") == "done"
        open_page(page, url, clear_storage=False)  # the key is kept: not asked again
        wait(page, lambda d: by_id(d, "model-name").text == os.path.basename(page_bundle))
        assert not by_id(page, "key-dialog").is_displayed()
        assert console_errors(page, allowed=("status of 401",)) == []


def test_a_video_upload_gets_an_answer(page, server, page_bundle, tmp_path):
    path = write_video(tmp_path / "clip.mp4", "libx264", 40, size=(320, 240))
    open_page(page, server)
    settings(page, temperature=0, max_tokens=8)
    turn = ask(page, "What happens?", files=(path,))
    assert turn.get_attribute("data-done") == "done", turn.text
    assert len(all_of(page, ".turn.user .thumbs video")) == 1
    video = {"type": "video_url", "video_url": {"url": data_url(path, "video/mp4")}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "What happens?"}, video]}]
    assert turn.get_attribute("data-raw") == load(page_bundle).generate(messages=messages, max_new_tokens=8).text
    assert console_errors(page) == []


ATTACH_JS = """
const [b64, name, kind] = arguments;
const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
const files = new DataTransfer();
files.items.add(new File([bytes], name, {type: "image/png"}));
if (kind === "paste") {
  document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: files, bubbles: true, cancelable: true}));
} else {
  window.dispatchEvent(new DragEvent("dragenter", {dataTransfer: files}));
  window.dispatchEvent(new DragEvent("drop", {dataTransfer: files, cancelable: true}));
}
"""


def test_images_pasted_and_dropped_are_sent_together(page, server, page_bundle, images):
    """The clipboard's and a drop's files (the browser's own events, with its DataTransfer) join the turn."""
    open_page(page, server)
    settings(page, temperature=0, max_tokens=8)
    for name, kind in (("square", "paste"), ("wide", "drop")):
        with open(images[name], "rb") as f:
            page.execute_script(ATTACH_JS, base64.b64encode(f.read()).decode(), f"{name}.png", kind)
    wait(page, lambda d: len(all_of(d, "#attachments .attachment")) == 2)
    turn = ask(page, "Compare the images.")
    assert len(all_of(page, ".turn.user .thumbs img")) == 2
    parts = [{"type": "image_url", "image_url": {"url": data_url(images[n], "image/png")}} for n in ("square", "wide")]
    messages = [{"role": "user", "content": [{"type": "text", "text": "Compare the images."}, *parts]}]
    assert turn.get_attribute("data-raw") == load(page_bundle).generate(messages=messages, max_new_tokens=8).text
    assert console_errors(page) == []
