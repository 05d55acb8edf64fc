"""
A real browser for tests: headless Chromium driven by Selenium, and the whole chain it talks to
(the real twistd controller and gateway as subprocesses on loopback, and the demo page as the
service "inside the container").

Selenium blocks, so every browser call runs in a thread (L{deferToThread}) and the reactor keeps
serving the page meanwhile.  Chromium sends every C{*.localhost} name to the loopback address by
itself, so the service URLs need no DNS.

Chromium and chromedriver come from Debian (C{chromium chromium-driver}); without them a test is
skipped, except under CI (C{CI=true}), where it fails.
"""

from __future__ import annotations

import os
import socket
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest

from arvproxy import demo
from arvproxy.backends.registry import RegistryStore
from arvproxy.config import ClusterConfig, load_config

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL = (
    "scripts/ensure-packages (as root: apt-get install chromium chromium-driver) and "
    ".venv/bin/pip install '.[dev]' (selenium)"
)
ARTIFACTS = os.path.join(demo.SOURCE_ROOT, "test-artifacts")
CLUSTER_ID = "zzzzz"
# Only ever used by these tests.
ROOT_TOKEN = "BrowserTestOnlySystemRootToken0123456789abcdefghij"

_T = TypeVar("_T")


def require_chromium() -> None:
    """
    Make sure a headless Chromium can be driven.

    @raise SkipTest: it cannot, outside CI.
    @raise RuntimeError: it cannot, under CI (C{CI=true}): CI must run the browser tests.
    """
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium Python package")
    if not missing:
        return
    reason = f"no headless browser: missing {', '.join(missing)}; install with {INSTALL}"
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"CI must run the browser tests, but there is {reason}")
    raise SkipTest(reason)


class Browser:
    """
    One headless Chromium with a fresh profile.  Every method runs the blocking WebDriver call
    in a thread and returns a Deferred.
    """

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    @classmethod
    async def start(cls, testcase: Any) -> Browser:
        """A browser for C{testcase}, quit by its cleanups."""
        require_chromium()
        profile = os.path.abspath(testcase.mktemp())
        os.makedirs(profile)
        browser = cls(await deferToThread(_new_driver, profile))
        testcase.addCleanup(lambda: deferToThread(browser.driver.quit))
        return browser

    def call(self, f: Callable[..., _T], *args: Any) -> defer.Deferred[_T]:
        """Run C{f(driver, *args)} in a thread."""
        return deferToThread(f, self.driver, *args)

    def get(self, url: str) -> defer.Deferred[None]:
        """Navigate to C{url} and wait until the page has loaded."""
        return self.call(lambda driver: driver.get(url))

    def current_url(self) -> defer.Deferred[str]:
        return self.call(lambda driver: driver.current_url)

    def title(self) -> defer.Deferred[str]:
        return self.call(lambda driver: driver.title)

    def cookies(self) -> defer.Deferred[list[dict[str, Any]]]:
        """The cookies of the current page's origin, as WebDriver describes them."""
        return self.call(lambda driver: driver.get_cookies())

    def text(self, css: str) -> defer.Deferred[str]:
        """The visible text of the first element matching C{css}."""
        from selenium.webdriver.common.by import By

        return self.call(lambda driver: driver.find_element(By.CSS_SELECTOR, css).text)

    def wait_for_text(
        self, css: str, predicate: Callable[[str], bool], timeout: float = 20.0
    ) -> defer.Deferred[str]:
        """
        Wait (in the thread, polling the page) until the text of C{css} satisfies C{predicate}.

        @return: that text.
        @raise selenium.common.exceptions.TimeoutException: not within C{timeout} seconds.
        """
        from selenium.common.exceptions import (
            NoSuchElementException,
            StaleElementReferenceException,
        )
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        def wait(driver: Any) -> str:
            def ready(d: Any) -> str | bool:
                text = d.find_element(By.CSS_SELECTOR, css).text
                return text if predicate(text) else False

            # A page that renders the element again between the finding and the reading leaves
            # a stale reference: look again at the next poll, as for one not there yet.
            return WebDriverWait(
                driver,
                timeout,
                poll_frequency=0.1,
                ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
            ).until(ready)

        return self.call(wait)

    def screenshot(self, name: str) -> defer.Deferred[str]:
        """Save a PNG of the viewport as C{test-artifacts/<name>.png}; returns its path."""
        os.makedirs(ARTIFACTS, exist_ok=True)
        path = os.path.join(ARTIFACTS, f"{name}.png")

        def save(driver: Any) -> str:
            if not driver.save_screenshot(path):
                raise RuntimeError(f"Chromium could not save the screenshot {path}")
            return path

        return self.call(save)


def _new_driver(profile: str) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
        # Loopback only, whatever proxy the environment names.
        "--no-proxy-server",
        "--window-size=1200,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(argument)
    service = Service(CHROMEDRIVER, log_output=os.path.join(profile, "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    return driver


# --- The chain the browser talks to ---------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(directory: str, port: int) -> str:
    """A cluster configuration for a controller on 127.0.0.1:C{port}, registry in C{directory}."""
    path = os.path.join(directory, "config.yml")
    with open(path, "w") as f:
        f.write(
            textwrap.dedent(
                f"""\
                Clusters:
                  {CLUSTER_ID}:
                    SystemRootToken: "{ROOT_TOKEN}"
                    Services:
                      ContainerWebServices:
                        ExternalURL: "http://*.containers.localhost:{port}"
                        InternalURLs:
                          "http://127.0.0.1:{port}": {{}}
                    ArvProxy:
                      Registry: registry.sqlite
                """
            )
        )
    return path


@dataclass
class BrowserChain:
    """
    A running chain: the demo page as a container's service, published by a container request
    that a fresh user owns, behind a real controller and gateway.
    """

    config: ClusterConfig
    container: demo.RunningContainer
    service: demo.DemoService
    request_uuid: str
    container_uuid: str
    token: str
    controller: demo.Child
    gateway: demo.Child

    @property
    def host(self) -> str:
        """The service's host name and port, as the browser sees it."""
        return f"{self.request_uuid}-{self.container.port}.containers.localhost:{self.port}"

    @property
    def port(self) -> int:
        port = self.config.external_url.port
        assert port is not None
        return port

    def url(self, token: str | None = None) -> str:
        return demo.service_url(self.config, self.request_uuid, self.container.port, token)


async def sign_in(browser: Browser, page: str, token: str) -> None:
    """Open the services page at C{page} and sign in there with C{token}, as a person does."""
    from selenium.webdriver.common.by import By

    await browser.get(page)
    await browser.wait_for_text("#sign-in", lambda t: "API token" in t)

    def submit(driver: Any) -> None:
        driver.find_element(By.ID, "token").send_keys(token)
        driver.find_element(By.CSS_SELECTOR, "#sign-in-form button").click()

    await browser.call(submit)


async def start_browser_chain(testcase: Any) -> BrowserChain:
    """
    Start the chain for C{testcase}; its cleanups stop it all (gateway, controller, service)
    and wait until every process has ended and every connection is closed.
    """
    directory = os.path.abspath(testcase.mktemp())
    os.makedirs(directory)
    config_path = write_config(directory, free_port())
    config = load_config(config_path)

    store = RegistryStore(config.registry_path, CLUSTER_ID, system_root_token=ROOT_TOKEN)
    testcase.addCleanup(store.close)
    user = store.create_user("Browser Test User")
    token, _ = store.create_token(user.uuid)

    container = demo.start_host_container(reactor)
    testcase.addCleanup(container.stop)
    assert container.service is not None
    request = store.create_container_request(user.uuid, published_ports={container.port: {}})
    assert request.container_uuid is not None

    controller = demo.start_controller(
        reactor, config_path, os.path.join(directory, "controller.log")
    )
    testcase.addCleanup(controller.stop, reactor)
    await _ready(controller)
    gateway = demo.start_gateway(
        reactor,
        config,
        config_path,
        request.container_uuid,
        os.path.join(directory, "gateway.log"),
        container.gateway_arguments,
    )
    testcase.addCleanup(gateway.stop, reactor)
    await _ready(gateway)
    return BrowserChain(
        config=config,
        container=container,
        service=container.service,
        request_uuid=request.uuid,
        container_uuid=request.container_uuid,
        token=token,
        controller=controller,
        gateway=gateway,
    )


async def _ready(child: demo.Child) -> None:
    try:
        await child.ready
    except demo.ChildFailed as e:
        raise AssertionError(f"{e}\n{e.tail}") from None
