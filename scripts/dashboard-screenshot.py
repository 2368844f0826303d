#!/usr/bin/env python3
"""Screenshots the live dashboard in headless Chromium (docs/dashboard.png).

Usage: scripts/dashboard-screenshot.py http://127.0.0.1:9090 OUT.png [SECONDS]

Reads the admin token from SWITCHBOARD_ADMIN_TOKEN, starts chromedriver on a
free loopback port, logs in through the page's own form (as an operator
would), lets the charts fill for SECONDS (default 20), saves a PNG and stops
the chromedriver it started. Uses only the standard library.
"""

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(base, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)["value"]


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    admin, out = sys.argv[1].rstrip("/"), sys.argv[2]
    settle = float(sys.argv[3]) if len(sys.argv) > 3 else 20.0
    token = os.environ.get("SWITCHBOARD_ADMIN_TOKEN")
    if not token:
        sys.exit("set SWITCHBOARD_ADMIN_TOKEN")
    driver_bin = shutil.which("chromedriver")
    chromium = shutil.which("chromium")
    if not driver_bin or not chromium:
        sys.exit("needs Debian's chromium and chromium-driver")
    port = free_port()
    driver = subprocess.Popen([driver_bin, f"--port={port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    profile = tempfile.mkdtemp(prefix="sb-shot-")
    try:
        deadline = time.time() + 15
        while True:
            try:
                call(base, "GET", "/status")
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        caps = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--window-size=1400,1000", f"--user-data-dir={profile}"]}}}}
        session = call(base, "POST", "/session", caps)["sessionId"]
        s = f"/session/{session}"
        call(base, "POST", s + "/url", {"url": admin + "/dashboard"})
        time.sleep(1)
        el = call(base, "POST", s + "/element", {"using": "css selector", "value": "#token"})
        eid = next(iter(el.values()))
        call(base, "POST", f"{s}/element/{eid}/value", {"text": token})
        el = call(base, "POST", s + "/element", {"using": "css selector", "value": "#login"})
        eid = next(iter(el.values()))
        call(base, "POST", f"{s}/element/{eid}/click", {})
        time.sleep(settle)
        png = base64.b64decode(call(base, "GET", s + "/screenshot"))
        with open(out, "wb") as f:
            f.write(png)
        call(base, "DELETE", s)
        print(f"wrote {out} ({len(png)} bytes)")
    finally:
        driver.terminate()
        driver.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
