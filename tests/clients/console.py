"""The web console in a real browser: Playwright driving Debian's
chromium (no browser download), against a control plane and agents the
Rust test started (tests/tests/e2e/console.rs passes their addresses and
tokens as JSON on stdin).

Each step prints what it checks; any failure raises, and the test fails
with this output. With SCREENSHOTS=DIR, the main pages are saved there
(docs/console/ in the repository).
"""

import json
import os
import re
import signal
import sys
import time
import urllib.request

from playwright.sync_api import expect, sync_playwright

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags chromium keeps calling out,
# which a machine without internet refuses.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# A loaded test machine (the whole suite runs at once) may take a while
# to render; every expectation still holds or the test fails.
expect.set_options(timeout=20_000)

setup = json.load(sys.stdin)
BASE = setup["console"]  # https://127.x.y.z:port
shots = os.environ.get("SCREENSHOTS")


def step(what):
    print(f"-- {what}", flush=True)


def shot(page, name):
    if shots:
        os.makedirs(shots, exist_ok=True)
        page.screenshot(path=os.path.join(shots, f"{name}.png"), full_page=True)


def agent(method, path):
    """A request to agent a's local API (plain HTTP on loopback)."""
    req = urllib.request.Request(f"http://{setup['agent']}{path}", method=method)
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read()


def log_in(page, token):
    page.goto(f"{BASE}/ui/")
    page.get_by_label("ACL token (SecretID)").fill(token)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Services")).to_be_visible()
    assert token not in page.url, "the token must never be in a URL"
    kept = page.evaluate("sessionStorage.getItem('signpost.token')")
    assert kept == token, "the token is kept in sessionStorage"


def log_out(page):
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_label("ACL token (SecretID)")).to_be_visible()


with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.on("dialog", lambda d: d.accept())

    step("a wrong token is refused")
    page.goto(f"{BASE}/ui/")
    page.get_by_label("ACL token (SecretID)").fill("not-a-token")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert").filter(has_text="not valid")).to_be_visible()

    step("log in with the admin token: the services")
    log_in(page, setup["admin"])
    web = page.get_by_role("row").filter(has=page.get_by_role("link", name="web", exact=True))
    expect(web).to_contain_text("1 passing")
    shot(page, "services")

    step("the service page; its check fails and the page shows it live")
    page.get_by_role("link", name="web", exact=True).click()
    expect(page.get_by_role("heading", name="Service web")).to_be_visible()
    instances = page.get_by_role("table", name="Instances")
    expect(instances).to_contain_text("web-1")
    expect(instances.locator(".badge.critical")).to_have_count(0)
    step("its traffic, as the agents' proxies report it")
    traffic = page.locator("#traffic")
    expect(traffic).to_contain_text("Requests/s", timeout=30_000)
    expect(traffic).to_contain_text("Reporting agents")
    rate = float(traffic.locator(".card .value").first.inner_text())
    assert rate > 0, f"requests per second: {rate}"
    page.evaluate("window.__notReloaded = true")
    agent("PUT", "/v1/agent/check/fail/service:web-1?note=disk%20full")
    expect(instances.locator(".badge.critical")).to_have_count(1)
    expect(instances).to_contain_text("disk full")
    # When it changed, as the control plane learned of it.
    expect(instances.locator(".check").filter(has_text="disk full")).to_contain_text(" since ")
    assert page.evaluate("window.__notReloaded === true"), "updated without a reload"
    shot(page, "service")
    agent("PUT", "/v1/agent/check/pass/service:web-1")
    expect(instances.locator(".badge.critical")).to_have_count(0)

    step("nodes")
    page.get_by_role("link", name="Nodes").click()
    nodes = page.get_by_role("table", name="Nodes")
    for node in ("a", "b"):
        row = nodes.get_by_role("row").filter(has=page.get_by_role("cell", name=node, exact=True))
        expect(row).to_contain_text("alive")
    shot(page, "nodes")

    step("a block command: the form validates like the CLI")
    page.get_by_role("link", name="Commands").click()
    page.get_by_label("Kind").select_option("block")
    page.get_by_label("Service").fill("web")
    page.get_by_label("Lasts for (TTL)").fill("10m")
    page.get_by_role("button", name="Create").click()
    expect(page.get_by_role("alert").filter(has_text="reason: say why")).to_be_visible()
    expect(page.get_by_role("alert").filter(has_text="instance: block needs the instance")).to_be_visible()
    page.get_by_label("Instance").fill(setup["instance"])
    page.get_by_label("Reason").fill("disk full on a")
    page.get_by_role("button", name="Create").click()
    expect(page.get_by_role("heading", name=re.compile("^Command "))).to_be_visible()
    step("applied_by fills in as the agent using web applies it")
    expect(page.locator("#applied-by li").filter(has_text=re.compile(r"^b$"))).to_be_visible()
    expect(page.locator("#applied-count")).to_contain_text("1 of 1")
    shot(page, "command")

    step("revoke it")
    page.get_by_role("button", name="Revoke").click()
    expect(page.locator("dd .badge")).to_have_text("revoked")
    page.get_by_role("link", name="← Commands").click()
    page.get_by_label("Show").select_option("")
    expect(page.get_by_role("table", name="Commands")).to_contain_text("revoked")
    shot(page, "commands")

    step("browse and edit a KV key")
    page.get_by_role("link", name="Key/value").click()
    page.get_by_role("link", name="config/").click()
    page.get_by_role("link", name="app/").click()
    page.get_by_role("link", name="greeting").click()
    value = page.get_by_label("Value of config/app/greeting")
    expect(value).to_have_value("hello")
    value.fill("bonjour")
    page.get_by_role("button", name="Save").click()
    expect(page.get_by_role("status")).to_have_text("Saved.")
    shot(page, "kv")

    step("a change made meanwhile is not overwritten (CAS)")
    page.reload()
    value = page.get_by_label("Value of config/app/greeting")
    expect(value).to_have_value("bonjour")
    changed = page.evaluate(
        """async (token) => (await fetch('/v1/kv/config/app/greeting', {
             method: 'PUT', headers: {'X-Consul-Token': token}, body: 'hallo'})).ok""",
        setup["admin"],
    )
    assert changed
    value.fill("hej")
    page.get_by_role("button", name="Save").click()
    expect(page.get_by_role("alert").filter(has_text="CAS conflict")).to_be_visible()

    step("delete a key, with confirmation")
    page.goto(f"{BASE}/ui/#/kv/config/app/old")
    # The page of that key, not the one before it.
    expect(page.get_by_role("heading", name="config/app/old")).to_be_visible()
    page.get_by_role("button", name="Delete…").click()
    expect(page.get_by_role("heading", name="Key/value")).to_be_visible()
    expect(page.get_by_role("link", name="old")).to_have_count(0)

    step("ACL and audit pages (admin)")
    page.get_by_role("link", name="ACL").click()
    expect(page.get_by_role("table", name="Tokens")).to_be_visible()
    shot(page, "acl")
    page.get_by_role("link", name="Audit log").click()
    expect(page.get_by_role("table", name="Audit log")).to_contain_text("command.create")
    shot(page, "audit")

    step("an operator token: admin pages hidden, and refused by the server")
    log_out(page)
    log_in(page, setup["operator"])
    expect(page.get_by_role("link", name="ACL")).to_be_hidden()
    expect(page.get_by_role("link", name="Commands")).to_be_visible()
    page.goto(f"{BASE}/ui/#/acl")
    expect(page.get_by_role("heading", name="Not allowed")).to_be_visible()
    page.get_by_role("link", name="Commands").click()
    expect(page.get_by_role("heading", name="New command")).to_be_visible()

    step("on a phone")
    page.set_viewport_size({"width": 390, "height": 844})
    page.get_by_role("link", name="Services").click()
    expect(page.get_by_role("link", name="web", exact=True)).to_be_visible()
    wide = page.evaluate("document.documentElement.scrollWidth > window.innerWidth + 1")
    assert not wide, "the services page fits a phone's width"
    shot(page, "services-phone")
    page.set_viewport_size({"width": 1280, "height": 800})

    step("the control plane goes away: a banner says so")
    os.kill(setup["control_plane_pid"], signal.SIGKILL)
    expect(page.get_by_role("alert").filter(has_text="Lost the connection to the control plane")).to_be_visible()
    browser.close()

print("console OK")
