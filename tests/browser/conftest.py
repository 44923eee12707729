"""Browser fixtures: Debian's chromium driven by Playwright, against a real black box and explainer on loopback.

Without playwright or /usr/bin/chromium the browser tests skip and say why; in CI (CI=true, where
.ci/run installs chromium) a missing browser is a failure instead, so they can never silently not run.
"""

from __future__ import annotations

import os
import secrets

import pytest

# pytest puts tests/browser on sys.path (no __init__.py), so the helpers import by their own name.
from page_browser import CHROMIUM, DESKTOP, explained_case, launch_chromium, misclassified_pngs

from advexplain.launch import ServiceProcess

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

# Test-only instrumentation, injected by the browser (not the page, so the page's CSP does not apply):
# keep the form fields of every fetch the page makes, for the tests to check what was sent.
RECORD_FETCH = """
window.__sentForms = [];
const pageFetch = window.fetch;
window.fetch = function (url, init) {
  const fields = {};
  if (init && init.body instanceof FormData) {
    for (const [name, value] of init.body.entries()) {
      fields[name] = value instanceof File ? {file: value.name, size: value.size} : value;
    }
  }
  window.__sentForms.push(fields);
  return pageFetch.apply(this, arguments);
};
"""


def missing(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason}; .ci/run installs it, so in CI this is an error")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium per test module (module scope keeps Playwright's event loop away from other modules)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install -e '.[test]')")
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        missing(f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def services(tiny_models, tmp_path_factory):
    """A tiny black box and an explainer with the white-box route on, as real processes on loopback."""
    logs = tmp_path_factory.mktemp("browser-logs")
    token = secrets.token_urlsafe(24)
    started: list[ServiceProcess] = []
    try:
        blackbox = ServiceProcess("blackbox", ["--model", str(tiny_models["blackbox"])], log_dir=logs)
        started.append(blackbox)
        blackbox.start()
        explainer = ServiceProcess(
            "explainer",
            ["--surrogate", str(tiny_models["surrogate"]), "--blackbox-url", blackbox.url,
             "--whitebox-model", str(tiny_models["blackbox"])],
            env={"EXPLAINER_WHITEBOX_TOKEN": token}, log_dir=logs)
        started.append(explainer)
        explainer.start()
        yield {"blackbox": blackbox, "explainer": explainer, "url": explainer.url, "token": token}
    finally:
        for proc in reversed(started):
            try:
                proc.stop()
            except Exception:  # noqa: BLE001 - teardown must reach every process
                proc.kill()


@pytest.fixture(scope="module")
def images(services, tiny_models, tmp_path_factory) -> dict[str, object]:
    """Files to upload: a misclassified image the explainer explains (checked over plain HTTP first),
    its true label, and a text file that is not an image."""
    folder = tmp_path_factory.mktemp("uploads")
    cases = misclassified_pngs(tiny_models["blackbox"], 6)
    assert cases, "the tiny black box must get some validation images wrong"
    chosen = explained_case(services["url"], cases)
    assert chosen is not None, f"none of {len(cases)} misclassified images was explained over HTTP"
    image = folder / "misclassified.png"
    image.write_bytes(chosen[0])
    text = folder / "notes.txt"
    text.write_text("this is not an image\n")
    return {"image": image, "label": chosen[1], "text": text}


@pytest.fixture
def open_page(browser, services):
    """`open_page(viewport)` -> a fresh page (its own context: no storage carried between tests) on the
    explainer's `/`. Any script error or Content-Security-Policy violation fails the test."""
    contexts = []
    problems: list[str] = []

    def on_console(message) -> None:
        if message.type == "error" and "Content Security Policy" in message.text:
            problems.append(f"console: {message.text}")

    def make(viewport=DESKTOP):
        context = browser.new_context(viewport=viewport, accept_downloads=True)
        contexts.append(context)
        context.add_init_script(RECORD_FETCH)
        page = context.new_page()
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on("console", on_console)
        page.goto(services["url"] + "/")
        page.wait_for_load_state("load")
        return page

    yield make
    for context in contexts:
        context.close()
    assert not problems, problems
