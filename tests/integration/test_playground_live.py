"""The playground page (issue 17) in a real headless Chromium (Debian's
`chromium`, driven by Playwright — never `playwright install`) against the
real daemon on the systemd test host. The test host shares this machine's
network namespace, so the browser, outside it, reaches the daemon at
127.0.0.1:<port> like the tests' own client.

A screenshot of each step goes to the directory printed at the start
(`playground-shots` under pytest's tmp dir)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.integration.test_runtimes import PIP_CACHE, requirements, unitbox
from tests.support.daemon import Client, Daemon
from tests.support.hostile import contained_afterwards
from tests.support.testhost import TestHost
from unitbox.api import playground

CHROMIUM = Path("/usr/bin/chromium")
TERMINAL = re.compile(r"^(succeeded|failed|timed_out|oom_killed|cancelled|error)$")
PLOTS = "plots"  # a runtime of this module's own: numpy and matplotlib


@pytest.fixture(scope="module", autouse=True)
def _contained(daemon: Daemon, testhost: TestHost) -> Iterator[None]:
    yield from contained_afterwards(daemon, testhost)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail("no /usr/bin/chromium: `make test-deps` installs Debian's chromium")
    if not (playground.ASSETS / "index.html").exists():
        pytest.fail("the playground is not built: `make playground` (make test does it first)")
    with sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("playground-shots")
    print(f"\nplayground screenshots: {directory}")
    return directory


@pytest.fixture
def page(browser: Any, daemon: Daemon) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.goto(daemon.client.base_url + "/")
    expect(opened.locator("#runtime option").first).to_be_attached()
    yield opened
    context.close()
    assert errors == [], f"errors in the page: {errors}"


@pytest.fixture(scope="module")
def plots(testhost: TestHost, daemon: Daemon) -> Iterator[str]:
    PIP_CACHE.mkdir(parents=True, exist_ok=True)
    code, output = unitbox(testhost, daemon, "build", PLOTS, "-r",
                           requirements(testhost, PLOTS, ["numpy", "matplotlib"]))
    assert code == 0, output
    yield PLOTS
    unitbox(testhost, daemon, "remove", PLOTS)


def set_code(page: Page, code: str) -> None:
    """Replaces the editor's text as a paste would (no auto-indent, no closing brackets added)."""
    page.locator(".cm-content").click()
    page.keyboard.press("Control+a")
    page.keyboard.press("Delete")
    page.keyboard.insert_text(code)


def ended(page: Page, timeout_s: float = 60) -> str:
    # Locator assertions, not wait_for_function(string): the page's CSP forbids eval, as it should.
    expect(page.locator("#state")).to_have_attribute("data-state", TERMINAL, timeout=timeout_s * 1000)
    return str(page.locator("#state").get_attribute("data-state"))


def decoded_size(image: Any) -> list[int]:
    """An output image's natural size, once its blob: URL is set and it has decoded."""
    image.scroll_into_view_if_needed()
    expect(image).to_have_attribute("src", re.compile(r"^blob:"))
    size: list[int] = image.evaluate("img => img.decode().then(() => [img.naturalWidth, img.naturalHeight])")
    return size


def run_id(page: Page) -> str:
    match = re.search(r"#run=([0-9a-f]+)$", page.url)
    assert match, page.url
    return match.group(1)


def test_type_code_press_run_see_the_output(page: Page, shots: Path, client: Client) -> None:
    page.locator(".cm-content").click()
    page.keyboard.press("Control+a")
    page.keyboard.type('import sys\nprint("hello from the browser", sys.argv[1:])\n')
    page.keyboard.type('print("to stderr", file=sys.stderr)\n')
    page.fill("#args", "one\ntwo words")
    page.screenshot(path=shots / "01-typed.png")
    page.click("#run")
    assert ended(page) == "succeeded"
    expect(page.locator("#console")).to_contain_text("hello from the browser ['one', 'two words']")
    expect(page.locator("#console .stderr")).to_have_text("to stderr\n")
    expect(page.locator("#facts")).to_contain_text("exit code")
    page.screenshot(path=shots / "02-output.png")
    assert client.status(run_id(page))["state"] == "succeeded"


def test_every_control_has_a_name_and_run_is_reached_by_keyboard(page: Page) -> None:
    unnamed = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button, [contenteditable]')]
        .filter(el => !el.closest('[hidden], dialog:not([open])'))
        .filter(el => !(el.labels?.length || el.getAttribute('aria-label') || el.textContent.trim()))
        .map(el => el.outerHTML.slice(0, 80))""")
    assert unnamed == []
    page.locator("#runtime").focus()
    for _ in range(4):  # runtime → main() → lint → Run
        if page.evaluate("document.activeElement.id") == "run":
            break
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "run"
    set_code(page, "print('by keyboard')\n")
    page.locator("#run").focus()
    page.keyboard.press("Enter")
    assert ended(page) == "succeeded"
    expect(page.locator("#console")).to_have_text("by keyboard\n")


def test_ctrl_enter_runs_and_main_mode_shows_the_result(page: Page, shots: Path) -> None:
    set_code(page, "def main():\n    return {'answer': 42, 'list': [1, 2]}\n")
    page.check("#entrypoint")
    page.locator(".cm-content").press("Control+Enter")
    assert ended(page) == "succeeded"
    expect(page.locator("#result")).to_have_text('{\n  "answer": 42,\n  "list": [\n    1,\n    2\n  ]\n}')
    page.screenshot(path=shots / "03-main-result.png")


def test_a_matplotlib_plot_shows_as_an_image_of_its_size(page: Page, shots: Path, plots: str) -> None:
    set_code(page, "import matplotlib.pyplot as plt\n"
                   "import numpy as np\n"
                   "x = np.linspace(0, 2 * np.pi, 200)\n"
                   "fig, ax = plt.subplots(figsize=(4, 3), dpi=100)\n"
                   "ax.plot(x, np.sin(x), label='sin')\n"
                   "ax.legend()\n"
                   "fig.savefig('plot.png')\n"
                   "fig.savefig('plot.svg')\n"
                   "print('saved')\n")
    page.select_option("#runtime", plots)
    page.fill("#limit-timeout_s", "60")
    page.fill("#limit-memory_mb", "1024")
    page.click("#run")
    assert ended(page, 120) == "succeeded", page.inner_text("#console")
    png = page.locator("#files img[data-path='plot.png']")
    svg = page.locator("#files img[data-path='plot.svg']")
    assert decoded_size(png) == [400, 300]
    assert decoded_size(svg) == [384, 288]  # 288 x 216 pt
    expect(page.locator("#files")).to_contain_text("image/png")
    page.screenshot(path=shots / "04-plot.png", full_page=True)


def test_dropped_files_and_stdin_reach_the_run(page: Page, shots: Path) -> None:
    dropped = page.evaluate_handle("""() => {
        const transfer = new DataTransfer();
        transfer.items.add(new File(["a,b\\n1,2\\n"], "table.csv", { type: "text/csv" }));
        transfer.items.add(new File([new Uint8Array([0, 159, 255])], "raw.bin"));
        return transfer;
    }""")
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": dropped})
    expect(page.locator("#input-files li")).to_have_count(2)
    set_code(page, "import sys\n"
                   "print(open('table.csv').read().splitlines(), list(open('raw.bin', 'rb').read()))\n"
                   "print(sys.stdin.read().upper())\n")
    page.fill("#stdin", "from stdin")
    page.screenshot(path=shots / "05-dropped-files.png")
    page.click("#run")
    assert ended(page) == "succeeded", page.inner_text("#console")
    expect(page.locator("#console")).to_have_text("['a,b', '1,2'] [0, 159, 255]\nFROM STDIN\n")


def test_an_endless_loop_with_a_1_s_limit_ends_timed_out(page: Page, shots: Path) -> None:
    set_code(page, "while True:\n    pass\n")
    page.fill("#limit-timeout_s", "1")
    page.click("#run")
    expect(page.locator("#stop")).to_be_enabled()
    page.screenshot(path=shots / "06-running.png")
    assert ended(page, 30) == "timed_out"
    expect(page.locator("#state")).to_have_text("timed out")
    expect(page.locator("#facts")).to_contain_text("error")
    page.screenshot(path=shots / "07-timed-out.png")


def test_a_lint_error_puts_a_marker_on_its_line(page: Page, shots: Path) -> None:
    set_code(page, "import os\n\nprint(undefined_name)\n")
    page.check("#lint")
    page.click("#run")
    assert ended(page) == "failed"
    expect(page.locator("#diagnostics")).to_contain_text("F821")
    error = page.locator(".cm-gutter-lint .cm-lint-marker-error")
    warning = page.locator(".cm-gutter-lint .cm-lint-marker-warning")
    expect(error).to_have_count(1)
    expect(warning).to_have_count(1)  # F401: os unused, on line 1

    def line_of(marker: Any) -> str:
        """The line number shown level with a gutter marker."""
        top = marker.bounding_box()["y"]
        for number in page.locator(".cm-lineNumbers .cm-gutterElement").all():
            box = number.bounding_box()
            if box and box["height"] > 0 and abs(box["y"] - top) < box["height"] / 2:
                return str(number.inner_text())
        raise AssertionError("no line number level with the marker")

    assert line_of(error) == "3"
    assert line_of(warning) == "1"
    page.screenshot(path=shots / "08-lint.png")


def test_stop_cancels_a_long_run(page: Page, shots: Path, client: Client) -> None:
    set_code(page, "import time\nprint('started', flush=True)\ntime.sleep(120)\n")
    page.fill("#limit-timeout_s", "150")
    page.click("#run")
    expect(page.locator("#console")).to_contain_text("started", timeout=30_000)
    expect(page.locator("#elapsed")).to_have_text(re.compile(r"^\d+\.\d s$"))
    page.click("#stop")
    assert ended(page, 30) == "cancelled"
    assert client.status(run_id(page))["state"] == "cancelled"
    page.screenshot(path=shots / "09-cancelled.png")


def test_a_shared_link_shows_the_runs_code_output_and_files(browser: Any, daemon: Daemon, client: Client,
                                                            shots: Path) -> None:
    code = ("print('shared output')\n"
            "open('dot.svg', 'w').write('<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"40\" height=\"30\">"
            "<rect width=\"40\" height=\"30\" fill=\"teal\"/></svg>')\n"
            "open('table.csv', 'w').write('a,b\\n1,2\\n')\n")
    run = client.run(code)
    assert run["state"] == "succeeded", run
    context = browser.new_context(viewport={"width": 390, "height": 844})  # a phone: one column
    page = context.new_page()
    page.goto(f"{daemon.client.base_url}/#run={run['id']}")
    assert ended(page) == "succeeded"
    expect(page.locator(".cm-content")).to_contain_text("print('shared output')")
    expect(page.locator("#console")).to_have_text("shared output\n")
    expect(page.locator("#files")).to_contain_text("table.csv")
    assert decoded_size(page.locator("#files img[data-path='dot.svg']")) == [40, 30]
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # nothing off screen
    page.screenshot(path=shots / "10-shared-link-narrow.png", full_page=True)
    context.close()


def test_recent_runs_reopen_a_run(page: Page, shots: Path, client: Client) -> None:
    run = client.run("print('from the list')")
    page.click("#recent-toggle")
    link = page.locator(f"#recent-list a[href='#run={run['id']}']")
    link.click()
    assert ended(page) == "succeeded"
    expect(page.locator("#console")).to_have_text("from the list\n")
    expect(page.locator(".cm-content")).to_have_text("print('from the list')")
    page.screenshot(path=shots / "11-recent.png")


def test_with_tokens_the_page_asks_once_and_keeps_the_token_out_of_urls(
        browser: Any, testhost: TestHost, tmp_path: Path, shots: Path) -> None:
    server = Daemon(testhost, tmp_path, config='[tokens.alice]\nsecret = "alice-playground-secret"\n',
                    name="playground-tokens")
    server.start()
    try:
        context = browser.new_context()
        page = context.new_page()
        urls: list[str] = []
        page.on("request", lambda request: urls.append(request.url))
        page.goto(server.client.base_url + "/")
        dialog = page.locator("#token-dialog")
        expect(dialog).to_be_visible()
        page.screenshot(path=shots / "12-token-asked.png")
        page.fill("#token-input", "alice-playground-secret")
        page.click("#token-dialog button[value=save]")
        expect(page.locator("#runtime option").first).to_be_attached()
        set_code(page, "print('with a token')\n")
        page.click("#run")
        assert ended(page) == "succeeded"
        expect(page.locator("#console")).to_have_text("with a token\n")
        assert page.evaluate("sessionStorage.getItem('unitbox-token')") == "alice-playground-secret"
        assert page.evaluate("localStorage.length") == 0
        assert not [u for u in urls if "secret" in u]
        assert any(u.endswith("/events") for u in urls)
        context.close()
    finally:
        server.stop()
