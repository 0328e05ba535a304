#!/usr/bin/python3
"""The status page (GET / of the admin API) in headless Chromium against a real
3-replica raftlb cluster: the DOM lists the replicas and the backends, a drain made
with `raftlb ctl` shows up after the page's own refresh, a node name full of HTML
stays text, and the page raises no Content-Security-Policy violation. Saves a
screenshot to target/status-page.png.

Needs Debian's chromium, chromium-driver and python3-selenium (scripts/test installs
them) and a built target/debug/raftlb. Run from the repository root:

    /usr/bin/python3 tests/browser/status_page.py [--raftlb target/debug/raftlb]

Every process it starts is stopped on the way out, failure or not; the whole run is
bounded (--timeout, 180 s by default).
"""

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

TOKEN = "browser-s3cret"
# Replica 1's node.name: free text in the config, so the page must show it as text.
EVIL_NAME = "lb-1 <img src=x onerror=\"window.pwned=1\"><script>window.pwned=2</script>&amp;"
POLL = 15.0  # seconds the DOM may take to show what is expected


class Failure(Exception):
    pass


class Backend(BaseHTTPRequestHandler):
    """A real HTTP backend: answers every GET with its own name."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        body = f"hello from {self.server.name}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def free_port():
    """A loopback port that was free a moment ago, below the kernel's ephemeral range
    (so no outgoing connection, a peer dialling or a probe, takes it before raftlb
    binds it), never the same twice in a run."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    for _ in range(1000):
        port = random.randrange(10000, max(ephemeral, 11000))
        if port in USED:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        USED.add(port)
        return port
    raise Failure("no free loopback port below the ephemeral range")


USED = set()


def api(admin, path, method="GET", timeout=3):
    request = urllib.request.Request(
        f"http://{admin}{path}", method=method,
        headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return json.loads(r.read())


def wait_for(what, check, seconds):
    """Polls check() until it returns a true value (returned) or fails after seconds."""
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (OSError, ValueError, KeyError, WebDriverException) as e:
            last = e
        time.sleep(0.25)
    raise Failure(f"{what}: not within {seconds:.0f} s" + (f" (last error: {last})" if last else ""))


def config(i, ports, backends, data_dir, token_file):
    peers = ", ".join(f"{j + 1}: 127.0.0.1:{p['peer']}" for j, p in enumerate(ports))
    name = EVIL_NAME if i == 0 else f"lb-{i + 1}"
    lines = [
        f"node: {{ name: {json.dumps(name)} }}",
        f"admin: {{ bind: 127.0.0.1:{ports[i]['admin']}, token_file: {json.dumps(token_file)} }}",
        "runtime: { shutdown_grace: 1s }",
        "cluster:",
        "  cluster_id: browser",
        f"  node_id: {i + 1}",
        "  initial_state: new",
        f"  bind: 127.0.0.1:{ports[i]['peer']}",
        f"  data_dir: {json.dumps(data_dir)}",
        f"  peers: {{ {peers} }}",
        "  heartbeat_interval: 100ms",
        "  election_timeout: 500ms",
        "leader_election:",
        "  lease_duration: 4s",
        "  renew_deadline: 3s",
        "  retry_period: 500ms",
        "  standby: serve",
        "listeners:",
        f"  front: {{ bind: 127.0.0.1:{ports[i]['listen']}, pool: web }}",
        "pools:",
        "  web:",
        "    health_check: { kind: tcp, interval: 500ms, timeout: 500ms, rise: 1, fall: 1 }",
        "    backends:",
    ]
    lines += [f"      - {{ name: {n}, address: 127.0.0.1:{p} }}" for n, p in backends]
    return "\n".join(lines) + "\n"


def run(args, procs, servers, drivers, scratch):
    raftlb = os.path.abspath(args.raftlb)
    if not os.access(raftlb, os.X_OK):
        raise Failure(f"{raftlb}: not an executable: run `cargo build` first")

    # Two real backends and one address nobody listens on (shows health down).
    backends = []
    for name in ("web-1", "web-2"):
        server = ThreadingHTTPServer(("127.0.0.1", 0), Backend)
        server.name = name
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        backends.append((name, server.server_address[1]))
    backends.append(("web-3", free_port()))

    token_file = os.path.join(scratch, "token")
    with open(token_file, "w") as f:
        f.write(TOKEN + "\n")
    ports = [{k: free_port() for k in ("admin", "peer", "listen")} for _ in range(3)]
    for i in range(3):
        data_dir = os.path.join(scratch, f"data-{i + 1}")
        path = os.path.join(scratch, f"raftlb-{i + 1}.yaml")
        with open(path, "w") as f:
            f.write(config(i, ports, backends, data_dir, token_file))
        log = open(os.path.join(scratch, f"raftlb-{i + 1}.log"), "w")
        procs.append(subprocess.Popen(
            [raftlb, "run", "--config", path], stdout=subprocess.DEVNULL, stderr=log,
            start_new_session=True))
    admins = [f"127.0.0.1:{p['admin']}" for p in ports]

    def formed():
        statuses = [api(a, "/api/v1/status") for a in admins]
        return all(s["cluster"]["quorum_reachable"] and s["cluster"]["leader_id"]
                   and s["lease"] and s["lease"]["holder_id"] for s in statuses)
    wait_for("the 3 replicas form a cluster with a lease holder", formed, 60)

    # Without credentials the page asks the browser to log in (basic auth).
    try:
        urllib.request.urlopen(f"http://{admins[0]}/", timeout=3)
        raise Failure("GET / without the token answered 2xx")
    except urllib.error.HTTPError as e:
        if e.code != 401 or not e.headers.get("WWW-Authenticate", "").startswith("Basic"):
            raise Failure(f"GET / without the token: {e.code} {e.headers}") from e

    def probed():
        pools = api(admins[0], "/api/v1/backends")["pools"]
        health = {b["name"]: b["health"] for p in pools for b in p["backends"]}
        return health == {"web-1": "up", "web-2": "up", "web-3": "down"}
    wait_for("replica 1 probes web-1 and web-2 up, web-3 down", probed, 30)

    # Some traffic through replica 1's listener, so bytes show on its page.
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", ports[0]["listen"]), timeout=3) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            s.settimeout(3)
            while s.recv(4096):
                pass

    options = Options()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu",
                 "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(flag)
    options.binary_location = args.chromium
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(args.chromedriver), options=options)
    drivers.append(driver)
    driver.set_page_load_timeout(15)
    driver.get(f"http://admin:{TOKEN}@{admins[0]}/")

    def listed():
        members = driver.find_elements(By.CSS_SELECTOR, "#replicas tr[data-member]")
        rows = driver.find_elements(By.CSS_SELECTOR, "tr[data-backend]")
        health = {r.get_attribute("data-backend"): r.get_attribute("data-health") for r in rows}
        return len(members) == 3 and health == {"web-1": "up", "web-2": "up", "web-3": "down"}
    wait_for("the page lists 3 replicas and backends web-1, web-2 up, web-3 down", listed, POLL)

    roles = sorted(r.get_attribute("data-role")
                   for r in driver.find_elements(By.CSS_SELECTOR, "#replicas tr[data-member]"))
    if roles != ["active", "standby", "standby"]:
        raise Failure(f"replica roles on the page: {roles}")
    shown_name = driver.find_element(By.ID, "node-name").text
    if shown_name != EVIL_NAME:
        raise Failure(f"the node name is not shown as text: {shown_name!r}")
    if driver.execute_script("return window.pwned === undefined") is not True:
        raise Failure("markup in node.name ran in the page")
    try:
        alert = driver.switch_to.alert
        raise Failure(f"an alert opened: {alert.text}")
    except NoAlertPresentException:
        pass
    # The inline stylesheet is allowed by its hash in the CSP (header colour).
    th = driver.find_element(By.CSS_SELECTOR, "#replicas th")
    if th.value_of_css_property("background-color") != "rgba(232, 236, 241, 1)":
        raise Failure("the inline style was not applied (CSP?): "
                      + th.value_of_css_property("background-color"))
    # The 5 requests above went to web-1 and web-2: their bytes are on the page.
    shown = sum(int(r.get_attribute("data-bytes-to-client"))
                for r in driver.find_elements(By.CSS_SELECTOR, "tr[data-backend]"))
    if shown < 5 * len("hello from web-1\n"):
        raise Failure(f"the page shows {shown} bytes to clients after 5 responses")

    # A drain made with ctl appears after the page's own refresh (no reload).
    driver.execute_script("document.body.dataset.loaded = 'first'; document.title = 'stale'")
    ctl = subprocess.run(
        [raftlb, "ctl", "--server", f"http://{admins[1]}", "--token-file", token_file,
         "backend", "drain", "web", "web-2"],
        capture_output=True, text=True, timeout=30)
    if ctl.returncode != 0 or "drained web/web-2" not in ctl.stdout:
        raise Failure(f"ctl backend drain: exit {ctl.returncode}: {ctl.stdout} {ctl.stderr}")

    def drained():
        r = driver.find_element(By.CSS_SELECTOR, 'tr[data-backend="web-2"]')
        return r.get_attribute("data-drained") == "true" and "drained" in r.text
    wait_for("web-2 shows drained after the refresh", drained, POLL)
    if driver.execute_script("return document.body.dataset.loaded") != "first":
        raise Failure("the page was reloaded instead of refreshed by its script")
    # The title (it names the role) is refreshed with the rest.
    if not driver.title.startswith("raftlb "):
        raise Failure(f"the title was not refreshed: {driver.title!r}")
    note = driver.find_element(By.ID, "refresh").text
    if not note.startswith("refreshed"):
        raise Failure(f"the refresh note says {note!r}")

    violations = [e["message"] for e in driver.get_log("browser")
                  if "Content Security Policy" in e["message"] or e["level"] == "SEVERE"]
    if violations:
        raise Failure("browser console errors: " + "; ".join(violations))

    os.makedirs(os.path.dirname(args.screenshot) or ".", exist_ok=True)
    if not driver.save_screenshot(args.screenshot):
        raise Failure(f"cannot save {args.screenshot}")
    print(f"ok: 3 replicas and 3 backends listed, drain shown after refresh; "
          f"screenshot {args.screenshot}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raftlb", default="target/debug/raftlb")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    parser.add_argument("--screenshot", default="target/status-page.png")
    parser.add_argument("--timeout", type=int, default=180, help="seconds for the whole run")
    args = parser.parse_args()

    def too_long(*_):
        raise Failure(f"the whole run took more than {args.timeout} s")
    signal.signal(signal.SIGALRM, too_long)
    signal.alarm(args.timeout)

    procs, servers, drivers = [], [], []
    scratch = tempfile.mkdtemp(prefix="raftlb-browser-")
    code = 0
    try:
        run(args, procs, servers, drivers, scratch)
    except Exception as e:  # noqa: BLE001: any failure is reported, then cleaned up
        code = 1
        print(f"FAIL: {type(e).__name__}: {e}", file=sys.stderr)
        for d in drivers:
            failed = os.path.splitext(args.screenshot)[0] + "-failed.png"
            try:
                d.save_screenshot(failed)
                print(f"the page as it was: {failed}", file=sys.stderr)
            except WebDriverException:
                pass
        for i in range(len(procs)):
            path = os.path.join(scratch, f"raftlb-{i + 1}.log")
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    tail = f.readlines()[-15:]
                print(f"--- tail of replica {i + 1}'s log:\n" + "".join(tail), file=sys.stderr)
    finally:
        signal.alarm(0)
        for d in drivers:
            try:
                d.quit()
            except WebDriverException:
                pass
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for s in servers:
            s.shutdown()
        subprocess.run(["rm", "-rf", scratch], check=False)
    return code


if __name__ == "__main__":
    sys.exit(main())
