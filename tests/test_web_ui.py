"""The web dashboard at /ui/ (issue 13) in a real headless Chromium, against a real daemon with fake-server
instances (and the real llama-server for the playground): the page lists them, a click stops and starts one, the
log view follows new lines, the playground shows streamed tokens, a wrong key is refused, /docs works offline,
and no request leaves 127.0.0.1.

The browser is the distribution's (`apt-get install chromium chromium-driver`; nothing downloads one): the tests
skip without it, except in CI (`CI=true`), where that is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import Cli
from test_api import Daemon, add_instance, start_daemon

pytestmark = pytest.mark.skipif(os.name == "nt", reason="the fake binary wrapper is a POSIX shell script")

KEY = "sk-web-ui-test"
CHROMIUM = os.environ.get("LLAMA_ORCH_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = os.environ.get("LLAMA_ORCH_TEST_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
WAIT_S = 15


def _missing(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{message}: in CI the browser tests must run (.ci/run installs chromium)")
    pytest.skip(message)


@pytest.fixture
def browser() -> Iterator:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed (pip install -e '.[test]')")
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        _missing("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,800",
        "--disable-extensions",
        "--no-first-run",
        "--disable-background-networking",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def keyed_daemon(cli: Cli) -> Iterator[Daemon]:
    running = start_daemon(cli, api_keys=[KEY])
    try:
        yield running
    finally:
        cli.run("daemon", "stop", timeout=60)
        cli.run("down", "--all", "--timeout", "1", timeout=120)


# -- page helpers ------------------------------------------------------------------------------------------------


def by_css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def wait_for(driver, condition, timeout: float = WAIT_S, message: str = ""):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(
        driver,
        timeout,
        poll_frequency=0.05,
        ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
    ).until(lambda d: condition(d), message)


def open_page(driver, daemon: Daemon, key: str | None = KEY) -> None:
    driver.get(daemon.url + "/ui/")
    if key is not None:
        field = wait_for(driver, lambda d: by_css(d, "#key") if by_css(d, "#key").is_displayed() else None)
        field.send_keys(key)
        by_css(driver, "#login-form button[type=submit]").click()


def row_status(driver, name: str) -> str | None:
    return by_css(driver, f'tr[data-name="{name}"]').get_attribute("data-status")


def wait_status(driver, name: str, status: str, timeout: float = WAIT_S) -> None:
    wait_for(driver, lambda d: row_status(d, name) == status, timeout, f"{name} shown {status}")


def requested_urls(driver) -> list[str]:
    """Every URL the page asked for since the last call (the browser's network log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def assert_local_only(urls: list[str], daemon: Daemon) -> None:
    assert urls, "the network log caught no request at all"
    foreign = [u for u in urls if not u.startswith(daemon.url + "/") and not u.startswith(("data:", "blob:"))]
    assert foreign == [], f"requests left {daemon.url}: {foreign}"


def start(daemon: Daemon, name: str) -> None:
    with daemon.client() as api:
        answer = api.post(f"/api/instances/{name}/start", params={"wait": "true", "timeout": 30})
        assert answer.status_code == 200, answer.text


# -- tests -------------------------------------------------------------------------------------------------------


def test_page_lists_instances_and_a_click_stops_and_starts_one(
    browser, keyed_daemon: Daemon, tiny_model: Path, fake_binary: Path
) -> None:
    for name in ("alpha", "beta"):
        add_instance(keyed_daemon.cli, name, tiny_model, fake_binary)
    start(keyed_daemon, "alpha")
    open_page(browser, keyed_daemon)
    wait_status(browser, "alpha", "running")
    wait_status(browser, "beta", "stopped")
    assert "status-running" in by_css(browser, 'tr[data-name="alpha"] td .badge').get_attribute("class")
    loaded_at = browser.execute_script("return window.llamaOrchLoadedAt")
    # Pushed, not polled: the snapshots of /api/stream keep coming (uptime moves) on one request.
    first = by_css(browser, 'tr[data-name="alpha"]').text
    wait_for(browser, lambda d: by_css(d, 'tr[data-name="alpha"]').text != first, message="the row updates live")

    by_css(browser, 'tr[data-name="alpha"] button[data-action="stop"]').click()
    dialog = wait_for(browser, lambda d: by_css(d, "#confirm") if by_css(d, "#confirm").is_displayed() else None)
    assert "Stop alpha?" in dialog.text
    clicked = time.monotonic()
    by_css(browser, "#confirm-ok").click()
    wait_status(browser, "alpha", "stopped")
    stop_shown_s = time.monotonic() - clicked
    print(f"stopped shown {stop_shown_s:.2f} s after the click")
    assert stop_shown_s < 3.0, f"stopped shown {stop_shown_s:.2f} s after the click"
    assert keyed_daemon.cli.ps()["alpha"]["status"] == "stopped"

    by_css(browser, 'tr[data-name="beta"] button[data-action="start"]').click()  # a start asks nothing
    wait_status(browser, "beta", "running")
    assert keyed_daemon.cli.ps()["beta"]["status"] in ("starting", "running")
    assert browser.execute_script("return window.llamaOrchLoadedAt") == loaded_at, "the page reloaded"
    assert_local_only(requested_urls(browser), keyed_daemon)


def test_log_view_follows_new_lines(browser, keyed_daemon: Daemon, tiny_model: Path, fake_binary: Path) -> None:
    add_instance(keyed_daemon.cli, "alpha", tiny_model, fake_binary)
    start(keyed_daemon, "alpha")
    open_page(browser, keyed_daemon)
    wait_status(browser, "alpha", "running")
    by_css(browser, 'tr[data-name="alpha"] th button').click()
    wait_for(
        browser,
        lambda d: "main: server is listening" in by_css(d, "#log").text or len(by_css(d, "#log").text.splitlines()) > 2,
        message="the log's tail",
    )
    wait_for(browser, lambda d: '"port"' in by_css(d, "#detail-config").text, message="the config")
    wait_for(browser, lambda d: "healthy" in by_css(d, "#detail-health").text, message="the health history")
    marker = f"line written by the test at {time.time()}"
    log_path = keyed_daemon.cli.home / "logs" / "alpha" / "stdout.log"
    assert marker not in by_css(browser, "#log").text
    with log_path.open("a") as log:
        log.write(marker + "\n")
    wait_for(browser, lambda d: marker in by_css(d, "#log").text, message="the new line in the log view")


def test_playground_shows_streamed_tokens(browser, keyed_daemon: Daemon, tiny_model: Path, fake_binary: Path) -> None:
    add_instance(
        keyed_daemon.cli, "alpha", tiny_model, fake_binary, args=["--fake-token-delay", "0.25", "--fake-tokens", "8"]
    )
    start(keyed_daemon, "alpha")
    open_page(browser, keyed_daemon)
    wait_status(browser, "alpha", "running")
    by_css(browser, '.tab[data-view="playground"]').click()
    wait_for(browser, lambda d: "alpha" in [o.text for o in d.find_elements("css selector", "#chat-model option")])
    by_css(browser, "#chat-send").click()
    # Streamed: some tokens are on the page while the answer is still coming, then all of them.
    partial = wait_for(
        browser,
        lambda d: (
            by_css(d, "#chat-output").get_attribute("data-state") == "streaming"
            and int(by_css(d, "#chat-output").get_attribute("data-chunks") or 0)
        ),
    )
    assert 0 < partial < 8
    wait_for(browser, lambda d: by_css(d, "#chat-output").get_attribute("data-state") == "done")
    assert by_css(browser, "#chat-output").get_attribute("data-chunks") == "8"
    assert by_css(browser, "#chat-output").text.strip()
    assert "8 tokens" in by_css(browser, "#chat-stats").text


def test_a_wrong_key_is_refused(browser, keyed_daemon: Daemon, tiny_model: Path, fake_binary: Path) -> None:
    add_instance(keyed_daemon.cli, "alpha", tiny_model, fake_binary)
    open_page(browser, keyed_daemon, key="sk-wrong")
    wait_for(browser, lambda d: "refused" in by_css(d, "#login-error").text, message="the refusal")
    assert not by_css(browser, "#view-instances").is_displayed()
    assert browser.find_elements("css selector", 'tr[data-name="alpha"]') == []
    # The same page takes the right key, without a reload.
    by_css(browser, "#key").send_keys(KEY)
    by_css(browser, "#login-form button[type=submit]").click()
    wait_status(browser, "alpha", "stopped")
    # The key travels as a bearer, never in a URL.
    assert not [u for u in requested_urls(browser) if KEY in u or "sk-wrong" in u]


def test_keyboard_only_and_a_phone_width(browser, keyed_daemon: Daemon, tiny_model: Path, fake_binary: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    add_instance(keyed_daemon.cli, "alpha", tiny_model, fake_binary)
    start(keyed_daemon, "alpha")
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True}
    )
    open_page(browser, keyed_daemon)
    wait_status(browser, "alpha", "running")
    # Readable on a phone: the table fits the width, with its status, health and actions.
    assert browser.execute_script("const s = document.querySelector('.scroll'); return s.scrollWidth <= s.clientWidth")
    stop_button = by_css(browser, 'tr[data-name="alpha"] button[data-action="stop"]')
    assert stop_button.is_displayed() and by_css(browser, 'tr[data-name="alpha"] .badge').is_displayed()

    # Tab reaches the stop button; Enter asks, Escape cancels, Enter on Confirm stops.
    actions = ActionChains(browser)
    for _ in range(40):
        if browser.switch_to.active_element == stop_button:
            break
        actions.send_keys(Keys.TAB).perform()
    assert browser.switch_to.active_element == stop_button, "Tab never reached the stop button"
    actions.send_keys(Keys.ENTER).perform()
    wait_for(browser, lambda d: by_css(d, "#confirm").is_displayed(), message="the confirmation")
    assert browser.switch_to.active_element == by_css(browser, "#confirm-cancel")  # the safe choice has the focus
    actions.send_keys(Keys.ESCAPE).perform()
    wait_for(browser, lambda d: not by_css(d, "#confirm").is_displayed(), message="the dialog closed")
    assert keyed_daemon.cli.ps()["alpha"]["status"] == "running"
    stop_button.send_keys(Keys.ENTER)
    wait_for(browser, lambda d: by_css(d, "#confirm").is_displayed(), message="the confirmation")
    actions.send_keys(Keys.TAB).perform()
    assert browser.switch_to.active_element == by_css(browser, "#confirm-ok")
    actions.send_keys(Keys.ENTER).perform()
    wait_status(browser, "alpha", "stopped")


def test_models_view_lists_files_and_pulls_with_progress(
    browser, cli: Cli, tiny_model: Path, fake_binary: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llama_orchestrator.testing.fake_hub import FakeHub

    hub = FakeHub()
    hub.add("me/tiny-GGUF", {"tiny-Q8_0.gguf": tiny_model.read_bytes() + b"\0"})
    hub.start()
    # The daemon pulls from the fake Hub on 127.0.0.1 (the browser only talks to the daemon).
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    daemon = start_daemon(cli, api_keys=[KEY])
    try:
        add_instance(cli, "alpha", tiny_model, fake_binary)
        open_page(browser, daemon)
        wait_status(browser, "alpha", "stopped")
        by_css(browser, '.tab[data-view="models"]').click()
        wait_for(browser, lambda d: "tiny.gguf" in by_css(d, "#files").text, message="the model files")
        assert "alpha" in by_css(browser, "#files").text  # used by
        wait_for(browser, lambda d: "alpha" in by_css(d, "#models").text, message="the router's models")
        by_css(browser, "#pull-ref").send_keys("me/tiny-GGUF:Q8_0")
        by_css(browser, "#pull-send").click()
        wait_for(
            browser,
            lambda d: "pulled" in by_css(d, "#pull-msg").text or "failed" in by_css(d, "#pull-msg").text,
            timeout=60,
            message="the pull's end",
        )
        assert "pulled" in by_css(browser, "#pull-msg").text, by_css(browser, "#pull-msg").text
        meter = by_css(browser, "#pull-progress progress")
        size = str(hub.size("me/tiny-GGUF", "tiny-Q8_0.gguf"))
        assert meter.get_attribute("value") == meter.get_attribute("max") == size
        wait_for(browser, lambda d: "tiny-Q8_0.gguf" in by_css(d, "#files").text, message="the pulled file listed")
        assert_local_only(requested_urls(browser), daemon)
    finally:
        cli.run("daemon", "stop", timeout=60)
        cli.run("down", "--all", "--timeout", "1", timeout=120)
        hub.stop()


def test_docs_work_offline(browser, keyed_daemon: Daemon) -> None:
    browser.get(keyed_daemon.url + "/docs")
    wait_for(browser, lambda d: "/api/instances" in by_css(d, ".swagger-ui").text, message="swagger-ui rendered")
    assert_local_only(requested_urls(browser), keyed_daemon)


# -- HTTP, no browser --------------------------------------------------------------------------------------------


def test_static_files_headers_and_the_stream_needs_the_key(
    keyed_daemon: Daemon, tiny_model: Path, fake_binary: Path
) -> None:
    add_instance(keyed_daemon.cli, "alpha", tiny_model, fake_binary)
    url = keyed_daemon.url
    index = httpx.get(url + "/ui/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    csp = index.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "http" not in csp
    assert index.headers["x-content-type-options"] == "nosniff" and index.headers["cache-control"] == "no-cache"
    script = httpx.get(url + "/ui/app.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert httpx.get(url + "/ui/app.js", headers={"If-None-Match": script.headers["etag"]}).status_code == 304
    assert httpx.get(url + "/ui").headers["location"] == "/ui/"
    for missing in ("/ui/nothing.js", "/ui/%2e%2e/api/web.py", "/ui/..%2F..%2Fapi%2Fweb.py", "/ui/vendor"):
        assert httpx.get(url + missing).status_code == 404, missing
    # The Host rule holds on /ui too (DNS rebinding).
    assert httpx.get(url + "/ui/", headers={"Host": "evil.example:80"}).status_code == 403
    html = index.text
    assert "http://" not in html and "https://" not in html
    docs = httpx.get(url + "/docs").text
    assert "cdn" not in docs.lower() and "/ui/vendor/swagger-ui/swagger-ui-bundle.js" in docs

    assert httpx.get(url + "/api/stream").status_code == 401
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("GET", url + "/api/stream", params={"interval": 0.2}, headers=headers, timeout=30) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        snapshots = []
        for line in answer.iter_lines():
            if line.startswith("data: "):
                snapshots.append(json.loads(line[6:]))
                if len(snapshots) == 2:
                    break
    first = snapshots[0]
    assert [(r["name"], r["status"]) for r in first["instances"]] == [("alpha", "stopped")]
    assert {"cpu_percent", "memory_bytes", "uptime_s", "restarts", "config_changed"} <= set(first["instances"][0])
    assert snapshots[1]["time"] > first["time"]


# -- the real llama-server ---------------------------------------------------------------------------------------


@pytest.mark.real_server
def test_playground_streams_from_the_real_llama_server(browser, cli: Cli, tiny_model: Path, real_binary: Path) -> None:
    daemon = start_daemon(cli)  # no keys: the page opens straight away, as for a new user on loopback
    try:
        add_instance(
            cli,
            "tiny",
            tiny_model,
            real_binary,
            healthcheck={"interval": 0.5, "timeout": 5, "retries": 3, "start_period": 120},
        )
        with daemon.client() as api:
            answer = api.post("/api/instances/tiny/start", params={"wait": "true", "timeout": 120})
            assert answer.status_code == 200, answer.text
        browser.get(daemon.url + "/ui/#playground")
        wait_for(browser, lambda d: "tiny" in [o.text for o in d.find_elements("css selector", "#chat-model option")])
        by_css(browser, "#chat-max").clear()
        by_css(browser, "#chat-max").send_keys("16")
        by_css(browser, "#chat-send").click()
        wait_for(
            browser, lambda d: by_css(d, "#chat-output").get_attribute("data-state") in ("done", "failed"), timeout=120
        )
        assert by_css(browser, "#chat-error").text == ""
        assert int(by_css(browser, "#chat-output").get_attribute("data-chunks") or 0) >= 2
        assert_local_only(requested_urls(browser), daemon)
    finally:
        cli.run("daemon", "stop", timeout=60)
        cli.run("down", "--all", "--timeout", "1", timeout=120)
