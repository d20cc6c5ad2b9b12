"""End to end in a real headless browser: Debian's Chromium driven by playwright (never downloaded).

Serves the demo on the embedded model, finds value vectors in the explorer and adds one to the
intervention, types a prompt, clicks Generate, and checks both continuations and their toxicity
scores appear; the page must fetch nothing from anywhere but its own server. Saves the
screenshot README shows (docs/ui.png).
"""
from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "ui.png"
PROMPT = "I can't believe you did that again, you"

pytestmark = [
    pytest.mark.embedded,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                       "(run .ci/install_browser.sh or `apt-get install -y chromium`)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(embedded):
    from ui.app import build_app, launch
    from ui.engine import SteerDemo

    demo = SteerDemo(*embedded)
    page = build_app(demo)
    port = _free_port()
    launch(page, port=port, block=False)
    try:
        yield demo, f"http://127.0.0.1:{port}/"
    finally:
        page.close()


def _text(page, selector: str) -> str:
    return page.locator(selector).inner_text()


def test_browser_explore_then_generate_side_by_side(served):
    from playwright.sync_api import expect, sync_playwright

    demo, url = served
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            elsewhere: list[str] = []
            page.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:")) else elsewhere.append(r.url))
            page.goto(url)
            page.locator("#prompt textarea").wait_for(timeout=60_000)
            edits_before = int(re.search(r"(\d+) value-vector edits", _text(page, "#summary"))[1])

            # explorer: find vectors for words, select the first result, add it to the intervention
            page.locator("#query textarea").fill("rain, umbrella")
            page.locator("#find").click()
            first = page.locator("#found td").filter(has_text=re.compile(r"^\s*L\d+\.N\d+\s*$")).first
            first.wait_for(timeout=60_000)
            vector = first.inner_text().strip()
            assert vector == demo.search("rain, umbrella", 10)[0][0]
            first.click()
            expect(page.locator("#chosen textarea")).to_have_value(vector, timeout=30_000)
            page.locator("#add").click()
            expect(page.locator("#summary")).to_contain_text(f"{edits_before + 1} value-vector edits", timeout=30_000)

            # generate: both continuations and both scores appear
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#generate").click()
            expect(page.locator("#steered-stats")).to_contain_text("toxicity", timeout=120_000)
            expect(page.locator("#unsteered-stats")).to_contain_text("toxicity", timeout=30_000)
            plain = page.locator("#unsteered textarea").input_value()
            steered = page.locator("#steered textarea").input_value()
            assert plain.strip() and steered.strip()
            scorer = demo.scorer_status
            for stats in (_text(page, "#unsteered-stats"), _text(page, "#steered-stats")):
                assert re.search(r"toxicity \d\.\d{3}", stats) and scorer in stats and "tokens/s" in stats
            # the page shows what the library computes for the same settings
            default = demo.default_spec()
            spec = demo.spec_from_rows(demo.edit_rows(demo.rows(default), vector, "scale", 0.0), default.name,
                                       demo.extra(default))
            expected = demo.generate(PROMPT, spec)
            assert (plain, steered) == (expected[0].text, expected[1].text)

            page.mouse.move(0, 0)
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            assert not elsewhere, f"the page fetched from elsewhere: {elsewhere[:5]}"
        finally:
            browser.close()

