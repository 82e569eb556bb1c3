"""The dashboard in a real headless browser (Debian's Chromium through Selenium) against a
real cluster: log in, see the hosts, watch a kernel started through the API appear without a
reload, kill a replica's process and watch the notice and the replacement, run admin
actions (checkpoint a kernel, drain and undrain a host), and check that a user sees only their own kernels; the API docs load with nothing
from the internet. Screenshots go to ``.test-artifacts/dashboard/`` (``tests/browser.py``).

One cluster and one browser for the module: four hosts, three replicas per kernel (a killed
replica is replaced on the fourth host)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nbcluster.identity import UsersFile

from ..browser import ARTIFACTS, chromium, require_chromium
from ..cluster import Cluster, running_cluster, wait_for

# One worker runs the module: its cluster and Chromium are started once, not once per worker.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("browser")]

#: Seconds the page may take to show what the API already says (it streams every second).
SHOWN = 20.0


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require_chromium()
    yield from chromium()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("dashboard")
    with running_cluster(root / "state", hosts=4, replicas=3) as c:
        yield c


@pytest.fixture(scope="module")
def tokens(cluster: Cluster) -> dict[str, str]:
    users = UsersFile(cluster.state_dir / "gateway" / "users.json")
    return {"alice": users.add("alice"), "bob": users.add("bob")}


def _until(driver: Any, condition: Any, what: str, timeout: float = SHOWN) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    # The page redraws rows from the event stream: an element found may be replaced before
    # it is read, and the next poll finds the new one.
    wait = WebDriverWait(
        driver, timeout, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException]
    )
    try:
        return wait.until(condition)
    except TimeoutException:
        _shot(driver, f"timeout-{what.replace(' ', '-')[:40]}")
        raise AssertionError(f"the dashboard did not show {what} within {timeout} s") from None


def _shot(driver: Any, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def _css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(driver.find_elements(By.CSS_SELECTOR, selector))


def _login(driver: Any, cluster: Cluster, token: str) -> None:
    """Open the dashboard in a fresh tab state and log in with ``token`` through the form."""
    driver.get(f"{cluster.url}/dashboard")
    driver.execute_script("sessionStorage.clear()")
    driver.get(f"{cluster.url}/dashboard")
    field = _until(driver, lambda d: _css(d, "#token") and _css(d, "#token")[0], "the login form")
    field.send_keys(token)
    _css(driver, "#login-form button[type=submit]")[0].click()
    _until(driver, lambda d: _css(d, "#link.live"), "a live stream")
    # Set after loading: gone if the page ever reloads.
    driver.execute_script("window.__notReloaded = true")


def _start_kernel(cluster: Cluster, token: str | None = None) -> str:
    headers = {} if token is None else {"Authorization": f"token {token}"}
    response = cluster.http.post("/api/kernels", json={}, headers=headers, timeout=120)
    assert response.status_code == 201, response.text
    kid: str = response.json()["id"]
    return kid


def _kernel_row(kid: str) -> str:
    return f'#kernels tr[data-kernel-id="{kid}"]'


def test_admin_sees_hosts_and_a_kernel_appear_without_reload(
    browser: Any, cluster: Cluster
) -> None:
    _login(browser, cluster, cluster.token)
    hosts = _until(
        browser,
        lambda d: len(_css(d, "#hosts tbody tr")) == 4 and _css(d, "#hosts tbody tr"),
        "four hosts",
    )
    assert [h.get_attribute("data-host") for h in hosts] == [f"host-{i}" for i in range(1, 5)]
    assert all(_css(browser, f'#hosts tr[data-host="host-{i}"] .gpubar') for i in range(1, 5))
    assert "host_joined" in {li.get_attribute("data-kind") for li in _css(browser, "#feed li")}
    _shot(browser, "1-hosts")

    kid = _start_kernel(cluster)
    row = _until(browser, lambda d: _css(d, _kernel_row(kid)), "the new kernel")[0]
    _until(
        browser,
        lambda d: len(_css(d, f"{_kernel_row(kid)} .replica.state-running")) == 3,
        "its three running replicas",
    )
    assert browser.execute_script("return window.__notReloaded === true"), "the page reloaded"
    assert row.find_elements("css selector", "th")[0].get_attribute("title") == kid
    _shot(browser, "2-kernel")


def test_a_killed_replica_shows_its_notice_and_its_replacement(
    browser: Any, cluster: Cluster
) -> None:
    _login(browser, cluster, cluster.token)
    kid = _start_kernel(cluster)
    wait_for(
        lambda: (
            all(r["state"] == "running" and r["pid"] for r in cluster.replicas(kid))
            and len(cluster.replicas(kid)) == 3
        ),
        60,
        "three running replicas",
    )
    victim = cluster.replicas(kid)[0]
    os.kill(victim["pid"], signal.SIGKILL)

    lost = _until(
        browser,
        lambda d: [
            li
            for li in _css(d, '#feed li[data-kind="replica_lost"]')
            if victim["replica_id"] in li.text
        ],
        "the replica_lost notice",
    )
    assert kid in lost[0].text
    _until(
        browser,
        lambda d: [
            li for li in _css(d, '#feed li[data-kind="replica_replaced"]') if kid in li.text
        ],
        "the replica_replaced notice",
        timeout=90,
    )
    # The kernel's row shows the dead replica and three running ones again.
    _until(
        browser,
        lambda d: (
            len(_css(d, f"{_kernel_row(kid)} .replica.state-running")) == 3
            and _css(
                d,
                f'{_kernel_row(kid)} .replica[data-replica-id="{victim["replica_id"]}"].state-dead',
            )
        ),
        "the replacement in the kernel's row",
    )
    assert browser.execute_script("return window.__notReloaded === true"), "the page reloaded"
    _shot(browser, "3-replica-replaced")


def test_an_admin_checkpoints_a_kernel_after_confirming(browser: Any, cluster: Cluster) -> None:
    _login(browser, cluster, cluster.token)
    kid = _start_kernel(cluster)
    wait_for(
        lambda: sum(r["state"] == "running" for r in cluster.replicas(kid)) == 3,
        60,
        "three running replicas",
    )
    button = _until(
        browser,
        lambda d: _css(d, f'{_kernel_row(kid)} button[data-action="checkpoint"]'),
        "the checkpoint button",
    )[0]
    button.click()
    dialog = _until(
        browser,
        lambda d: [x for x in _css(d, "#confirm") if x.get_attribute("open") is not None],
        "the confirmation",
    )[0]
    assert kid in dialog.text
    _shot(browser, "4-confirm")
    _css(browser, "#confirm-ok")[0].click()
    toast = _until(
        browser,
        lambda d: "checkpoint" in _css(d, "#toast")[0].text and _css(d, "#toast")[0],
        "the checkpoint's answer",
        timeout=60,
    )
    assert "done" in toast.text, toast.text
    _shot(browser, "5-checkpointed")


def test_an_admin_drains_and_undrains_a_host_after_confirming(
    browser: Any, cluster: Cluster
) -> None:
    _login(browser, cluster, cluster.token)
    row = '#hosts tr[data-host="host-4"]'
    for action, shown in (("drain", "draining"), ("undrain", "connected")):
        button = _until(
            browser,
            lambda d, a=action: _css(d, f'{row} button[data-action="{a}"]'),
            f"the {action} button",
        )[0]
        button.click()
        dialog = _until(
            browser,
            lambda d: [x for x in _css(d, "#confirm") if x.get_attribute("open") is not None],
            f"the {action} confirmation",
        )[0]
        assert "host-4" in dialog.text
        if action == "drain":
            _shot(browser, "5b-drain-confirm")
        _css(browser, "#confirm-ok")[0].click()
        # The row redraws from the stream (the notice brings a fresh overview), no reload.
        _until(
            browser,
            lambda d, s=shown: _css(d, f"{row} td") and _css(d, f"{row} td")[0].text.endswith(s),
            f"host-4 {shown}",
        )
        host = next(
            h for h in cluster.http.get("/api/cluster/hosts").json() if h["name"] == "host-4"
        )
        assert host["draining"] is (action == "drain")
        if action == "drain":
            _shot(browser, "5c-drained")
    assert browser.execute_script("return window.__notReloaded === true")


def test_a_user_sees_only_their_own_kernels(
    browser: Any, cluster: Cluster, tokens: dict[str, str]
) -> None:
    theirs = _start_kernel(cluster, tokens["alice"])
    admins = _start_kernel(cluster)
    _login(browser, cluster, tokens["alice"])
    _until(browser, lambda d: _css(d, _kernel_row(theirs)), "alice's kernel")
    shown = {r.get_attribute("data-kernel-id") for r in _css(browser, "#kernels tbody tr")}
    assert shown == {theirs}
    assert admins not in shown
    assert not _css(browser, "#hosts-card")[0].is_displayed(), "a user sees the hosts"
    assert not _css(browser, 'button[data-action="migrate"]'), "a user is offered migration"
    assert not _css(browser, 'button[data-action="drain"]'), "a user is offered a drain"
    assert "alice (user)" in _css(browser, "#who")[0].text
    _shot(browser, "6-user-alice")

    _login(browser, cluster, tokens["bob"])
    _until(browser, lambda d: _css(d, "#kernels-empty")[0].is_displayed(), "bob's empty list")
    assert not _css(browser, "#kernels tbody tr")


def test_phone_width_and_offline_docs(browser: Any, cluster: Cluster) -> None:
    _login(browser, cluster, cluster.token)
    browser.set_window_size(390, 844)
    try:
        _until(browser, lambda d: _css(d, "#hosts tbody tr"), "the hosts at phone width")
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - window.innerWidth"
        )
        assert overflow <= 1, f"the page is {overflow} px wider than a phone's screen"
        _shot(browser, "7-phone")
    finally:
        browser.set_window_size(1280, 800)
    # Same tab: the docs use the dashboard's token; every file comes from the gateway.
    browser.get(f"{cluster.url}/docs")
    title = _until(browser, lambda d: _css(d, ".swagger-ui .info .title"), "Swagger UI")[0]
    assert "nbcluster gateway" in title.text
    _until(browser, lambda d: _css(d, ".opblock-summary-path"), "the API's operations")
    _shot(browser, "8-docs")
    browser.get(f"{cluster.url}/redoc")
    _until(
        browser, lambda d: "nbcluster gateway" in d.find_element("tag name", "body").text, "ReDoc"
    )
