"""Take the README's screenshot of the web dashboard (docs/ui.png): a throwaway home with fake-server instances in
different states, its daemon, a little traffic through the router, and headless Chromium at 1280x800.

    .venv/bin/python scripts/ui_screenshot.py [--out docs/ui.png] [--seconds 32] [--size 1280x800]

Needs the distribution's chromium and chromium-driver and selenium (the test extras). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LLAMA_ORCH_HOME": str(home), "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-m", "llama_orchestrator", *args], env=env, text=True, capture_output=True, timeout=120
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except (httpx.HTTPError, ValueError, KeyError):  # not yet: the daemon is starting, or the instance unknown
            pass
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "ui.png")
    parser.add_argument("--seconds", type=float, default=32.0, help="traffic before the shot (fills the charts)")
    parser.add_argument("--size", default="1280x800", help="the page's size, WIDTHxHEIGHT (390x844: a phone)")
    args = parser.parse_args()

    width, height = (int(v) for v in args.size.split("x"))
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from llama_orchestrator.testing.tiny_gguf import write_tiny_model

    work = Path(tempfile.mkdtemp(prefix="llama-orch-ui-"))
    home = work / "home"
    home.mkdir(mode=0o700)
    model = write_tiny_model(work / "qwen2.5-0.5b-tiny.gguf")
    binary = work / "llama-server"
    binary.write_text(
        f'#!/bin/sh\nPYTHONPATH="{SRC}" exec "{sys.executable}" -m llama_orchestrator.testing.fake_server "$@"\n'
    )
    binary.chmod(0o755)
    api_port = free_port()
    (home / "orchestrator.json").write_text(json.dumps({"api": {"port": api_port}}))
    instances = {
        "chat": {"args": ["--fake-token-delay", "0.03", "--fake-tokens", "24"], "aliases": ["assistant"]},
        "embed": {},
        "coder": {},
        "crashy": {"args": ["--fake-crash-after", "1"], "restart": {"policy": "never"}},
        "slowload": {"args": ["--fake-load-seconds", "600"], "healthcheck": {"start_period": 900, "interval": 1}},
    }
    for name, extra in instances.items():
        doc = {
            "name": name,
            "model": {"path": str(model), "context_size": 2048},
            "server": {"port": free_port()},
            "binary": str(binary),
            "healthcheck": {"interval": 1, "timeout": 2, "retries": 3, "start_period": 10},
        }
        doc.update(extra)
        folder = home / "instances" / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(doc, indent=2))
    url = f"http://127.0.0.1:{api_port}"
    print(cli(home, "daemon", "start").stdout.strip())
    try:
        client = httpx.Client(base_url=url, headers={"Content-Type": "application/json"}, timeout=60)
        for name in ("chat", "embed", "crashy", "slowload"):
            client.post(f"/api/instances/{name}/start")
        wait(lambda: client.get("/api/instances/chat").json()["health"] == "healthy", 30, "chat healthy")
        wait(lambda: client.get("/api/instances/embed").json()["health"] == "healthy", 30, "embed healthy")
        wait(lambda: client.get("/api/instances/crashy").json()["status"] == "exited", 30, "crashy exited")
        # Drift: embed's file now declares another context size than it runs with.
        config = home / "instances" / "embed" / "config.json"
        doc = json.loads(config.read_text())
        doc["model"]["context_size"] = 4096
        config.write_text(json.dumps(doc, indent=2))

        stop = threading.Event()

        def traffic() -> None:
            body = {"model": "assistant", "messages": [{"role": "user", "content": "hi"}], "stream": True}
            while not stop.is_set():
                with client.stream("POST", "/v1/chat/completions", json=body) as answer:
                    for _ in answer.iter_bytes():
                        pass

        workers = [threading.Thread(target=traffic, daemon=True) for _ in range(2)]
        for worker in workers:
            worker.start()

        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for arg in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--window-size=1280,800",
            "--hide-scrollbars",
            "--force-color-profile=srgb",
        ):
            options.add_argument(arg)
        driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
        try:
            # The page itself at that size (a window of that size has less room for the page).
            driver.execute_cdp_cmd(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 700},
            )
            driver.get(url + "/ui/")
            time.sleep(args.seconds)  # a script, not a test: let the charts fill with real samples
            driver.find_element("css selector", 'tr[data-name="embed"] th button').click()
            time.sleep(2)
            driver.execute_script("window.scrollTo(0, 0)")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
            print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")
        finally:
            stop.set()
            driver.quit()
    finally:
        cli(home, "daemon", "stop")
        cli(home, "down", "--all", "--timeout", "1")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
