"""End to end in a real headless browser: Debian's Chromium driven by playwright (never downloaded).

Serves the demo on the embedded model, finds value vectors in the explorer and adds one to the
intervention, types a prompt, clicks Generate, and checks both continuations and their toxicity
scores appear; the page must fetch nothing from anywhere but its own server. The screenshot goes
to a temporary folder; with STEER_REFRESH_SCREENSHOT=1 it refreshes the one README shows
(docs/ui.png).
"""
from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
README_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "ui.png"
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
    from steer.ui.app import build_app, launch
    from steer.ui.engine import SteerDemo

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


def test_browser_explore_then_generate_side_by_side(served, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from steer import Spec

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
            first = page.locator('#found [data-testid="cell-0-0"]')
            expect(first).to_have_text(re.compile(r"^\s*L\d+\.N\d+\s*$"), timeout=60_000)
            vector = first.inner_text().strip()
            assert vector == demo.search("rain, umbrella", 10)[0][0]
            first.click()
            expect(page.locator("#chosen textarea")).to_have_value(vector, timeout=30_000)
            page.locator("#add").click()
            expect(page.locator("#summary")).to_contain_text(f"{edits_before + 1} value-vector edits", timeout=30_000)

            # the download button offers the intervention shown, as a spec file
            default = demo.default_spec()
            spec = demo.spec_from_rows(demo.edit_rows(demo.rows(default), vector, "scale", 0.0), default.name,
                                       demo.extra(default))
            with page.expect_download(timeout=30_000) as download:
                page.locator("#download").click()
            assert Spec.load(download.value.path()) == spec

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
            expected = demo.generate(PROMPT, spec)
            assert (plain, steered) == (expected[0].text, expected[1].text)

            page.mouse.move(0, 0)
            shot = README_SCREENSHOT if os.environ.get("STEER_REFRESH_SCREENSHOT") == "1" else tmp_path / "ui.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000

            # loading a spec file replaces the intervention
            uploaded = Spec.build("two vectors", [("L3.N7", "set", 2.0), ("L20.N5", "scale", 0.0)], model=demo.model)
            with page.expect_file_chooser(timeout=30_000) as chooser:
                page.locator("#upload").click()
            chooser.value.set_files(str(uploaded.save(tmp_path / "two.json")))
            expect(page.locator("#summary")).to_contain_text("two vectors: 2 value-vector edits on 2 layers",
                                                             timeout=30_000)

            # choosing "my own words" shows the words box; Enter builds the intervention from them
            expect(page.locator("#words")).to_be_hidden()
            page.locator("#concept").get_by_text("my own words").click()
            page.locator("#words textarea").fill("rain, umbrella")
            page.locator("#words textarea").press("Enter")
            expect(page.locator("#summary")).to_contain_text("suppress rain, umbrella x1 top20: 20 value-vector edits",
                                                             timeout=60_000)

            # a bad request shows a message in the page, not a stack trace
            page.locator("#prompt textarea").fill("x" * (demo.limits.prompt_chars + 1))  # past the box's maxlength
            assert len(page.locator("#prompt textarea").input_value()) == demo.limits.prompt_chars
            page.locator("#prompt textarea").fill("   ")
            page.locator("#generate").click()
            expect(page.get_by_text("the prompt is only whitespace")).to_be_visible(timeout=30_000)
            assert "Traceback" not in page.content()
            assert not elsewhere, f"the page fetched from elsewhere: {elsewhere[:5]}"
        finally:
            browser.close()

