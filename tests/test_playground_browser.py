"""The playground as a person uses it: Debian's headless chromium (Playwright) opens the page that
`make run` serves (the session's stack, tests/fixtures_make_run.py) and chats, stops a long reply,
draws the embeddings heatmap and creates a prediction that it sees succeed. One browser session
for the whole module, so the tests run in order. A screenshot of every tab lands in
test-results/playground/ (ignored by git) for a person to look at."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
from playwright.async_api import Locator, Page, async_playwright, expect

from tests.fixtures_make_run import RunningStack
from tests.stack import ROOT

SHOTS = ROOT / "test-results" / "playground"
TABS = ("Chat", "Math", "Coding", "Embeddings", "Predictions", "Status")
# Streamlit's first page load compiles nothing, but the first script run imports the app's
# modules (pandas, altair, the typed client) on a shared, busy machine.
FIRST_LOAD_MS = 120_000
CREATED = re.compile(r"^Created (\S+): (starting|processing|succeeded)$")
CAPTION = re.compile(r"TTFT [\d.]+ s · [\d.]+ tokens/s · \d+ tokens · finish: \w+")
# Records the last chat message's text at every change, with whether the Stop button (shown only
# while a reply streams) was on the page at that moment.
WATCH_REPLY = """() => {
  window.__replies = [];
  const record = () => {
    const messages = document.querySelectorAll('[data-testid="stChatMessage"]');
    const last = messages[messages.length - 1];
    if (!last) return;
    const text = last.innerText;
    const streaming = document.querySelector('.st-key-chat_stop button') !== null;
    const previous = window.__replies[window.__replies.length - 1];
    if (!previous || previous.text !== text || previous.streaming !== streaming) {
      window.__replies.push({text, streaming});
    }
  };
  new MutationObserver(record).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def envoy_json(stack: RunningStack, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.ports['ENVOY_PORT']}{path}", timeout=10) as reply:
        answer: dict[str, Any] = json.loads(reply.read())
    return answer


def generator_running(stack: RunningStack) -> int:
    """The generators' running requests, from the gateway's `GET /stats` through Envoy."""
    stats = envoy_json(stack, "/stats")
    return sum(int(c["requests_running"]) for c in stats["components"] if c["component"] == "generator")


@pytest.fixture(scope="module")
def playground_url(make_run: RunningStack) -> str:
    return f"http://localhost:{make_run.ports['PLAYGROUND_PORT']}"


@pytest.fixture(scope="module")
async def page(playground_url: str) -> AsyncIterator[Page]:
    chromium = shutil.which("chromium")
    assert chromium, (
        "Debian's chromium is missing: `make test` installs it (apt-get install chromium, as root)"
    )
    SHOTS.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            tab = await browser.new_page(viewport={"width": 1400, "height": 1000})
            await tab.goto(playground_url)
            await tab.get_by_role("tab", name="Chat").wait_for(timeout=FIRST_LOAD_MS)
            await tab.get_by_placeholder("Ask the model").wait_for(timeout=FIRST_LOAD_MS)
            yield tab
        finally:
            await browser.close()


async def open_tab(page: Page, label: str) -> None:
    await page.get_by_role("tab", name=label, exact=True).click()


def widget(page: Page, testid: str, label: str) -> Locator:
    """The Streamlit widget of this kind whose label is `label`."""
    return page.locator(f'[data-testid="{testid}"]').filter(
        has=page.locator('[data-testid="stWidgetLabel"]', has_text=re.compile(f"^{re.escape(label)}$"))
    )


async def set_number(page: Page, label: str, value: int) -> None:
    field = widget(page, "stNumberInput", label).locator("input")
    await field.fill(str(value))
    # Streamlit commits a number on Enter (or blur), with a rerun.
    await field.press("Enter")
    await page.wait_for_timeout(500)


async def ask(page: Page, question: str) -> None:
    box = page.get_by_placeholder("Ask the model")
    await box.fill(question)
    await box.press("Enter")


async def last_reply(page: Page) -> Locator:
    return page.locator('[data-testid="stChatMessage"]').last


async def no_exception(page: Page) -> None:
    shown = page.locator('[data-testid="stException"]')
    assert await shown.count() == 0, await shown.first.inner_text()


async def test_the_chat_streams_paris_at_temperature_zero(page: Page) -> None:
    await open_tab(page, "Chat")
    thumb = widget(page, "stSlider", "Temperature").locator('input[type="range"]')
    await thumb.focus()
    # Home puts a slider at its minimum: 0.
    await thumb.press("Home")
    await expect(thumb).to_have_value("0")
    # The new value reaches the server with the rerun the change starts.
    await page.wait_for_timeout(1000)
    await page.evaluate(WATCH_REPLY)
    await ask(page, "What is the capital of France?")
    await page.get_by_text(CAPTION).last.wait_for(timeout=180_000)
    replies: list[dict[str, Any]] = await page.evaluate("window.__replies")
    final = await (await last_reply(page)).inner_text()
    assert "Paris" in final, final
    streaming = [r["text"] for r in replies if r["streaming"] and "Paris" in r["text"]]
    assert streaming, f"'Paris' was never on the page while the Stop button was: {replies}"
    # Token by token: the reply grew in several steps before it was complete.
    growing = {r["text"] for r in replies if r["streaming"]}
    assert len(growing) >= 3, replies
    await no_exception(page)


async def test_stop_cancels_the_generation(page: Page, make_run: RunningStack) -> None:
    await open_tab(page, "Chat")
    await set_number(page, "Max tokens", 400)
    assert generator_running(make_run) == 0
    await ask(page, "Write a very long story about a dragon.")
    stop = page.locator(".st-key-chat_stop button")
    await stop.wait_for(timeout=120_000)
    # Some of the story first, so that the generation is surely under way.
    await page.wait_for_function(
        """() => { const m = document.querySelectorAll('[data-testid="stChatMessage"]');
                   return m.length && m[m.length - 1].innerText.length > 80; }""",
        timeout=120_000,
    )
    assert generator_running(make_run) >= 1
    partial = await (await last_reply(page)).inner_text()
    await stop.click()
    deadline = time.monotonic() + 5
    running = generator_running(make_run)
    while running and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        running = generator_running(make_run)
    assert running == 0, "the generator still runs the request 5 s after Stop"
    await stop.wait_for(state="detached", timeout=30_000)
    # The partial reply stays in the conversation, marked stopped.
    kept = page.locator('[data-testid="stChatMessage"]').filter(has_text="finish: stopped").last
    await kept.wait_for(timeout=30_000)
    assert partial.strip()[:60] in await kept.inner_text()
    await no_exception(page)


async def test_the_embeddings_tab_draws_the_heatmap(page: Page) -> None:
    await open_tab(page, "Embeddings")
    sentences = widget(page, "stTextArea", "Sentences (one per line)").locator("textarea")
    await sentences.fill("A cat sits on the mat.\nA kitten rests on a rug.\nThe stock market fell today.")
    # A text area commits on blur.
    await sentences.blur()
    await page.wait_for_timeout(500)
    await page.get_by_role("button", name="Embed", exact=True).click()
    chart = page.locator('[data-testid="stVegaLiteChart"]').locator("canvas, svg").first
    await chart.wait_for(timeout=120_000)
    box = await chart.bounding_box()
    assert box and box["width"] > 50 and box["height"] > 50, box
    await page.get_by_text("Nearest neighbours").first.wait_for(timeout=30_000)
    await no_exception(page)


async def test_a_prediction_created_in_the_tab_succeeds_with_its_output(
    page: Page, make_run: RunningStack
) -> None:
    await open_tab(page, "Predictions")
    await set_number(page, "Max tokens", 8)
    prompt = widget(page, "stTextArea", "Prompt").locator("textarea")
    await prompt.fill("The capital of France is")
    await prompt.blur()
    await page.wait_for_timeout(500)
    await page.get_by_role("button", name="Create", exact=True).click()
    created = page.get_by_text(CREATED)
    await created.wait_for(timeout=60_000)
    found = CREATED.match((await created.inner_text()).strip())
    assert found, await created.inner_text()
    prediction_id = found.group(1)
    status = page.locator(".st-key-prediction_status")
    await expect(status).to_contain_text("succeeded", timeout=180_000)
    # The output shows once the row has it; the same prediction over REST says what it is.
    output = page.locator(".st-key-prediction_output")
    await expect(output).not_to_be_empty(timeout=30_000)
    shown = (await output.inner_text()).strip()
    stored = envoy_json(make_run, f"/v1/predictions/{prediction_id}")
    assert stored["status"] == "succeeded", stored
    assert stored["input"]["parameters"]["max_new_tokens"] == 8, stored["input"]
    text = stored["output"]["generated_text"].strip()
    assert text and text == shown, (text, shown)
    # The picker has it selected, labelled from the table's list (newest first), and it ended: no
    # Cancel.
    picker = widget(page, "stSelectbox", "Prediction")
    label = f"{prediction_id} · succeeded · {stored['model']}"
    await expect(picker).to_match_aria_snapshot(f'- combobox "Prediction": {label}')
    await expect(page.get_by_role("button", name="Cancel", exact=True)).to_have_count(0)
    await no_exception(page)


async def test_a_screenshot_of_every_tab(page: Page) -> None:
    labels = [text.strip() for text in await page.get_by_role("tab").all_inner_texts()]
    # `make run` starts the predictions service, so its tab is there.
    assert labels == list(TABS), labels
    # Tall enough for a whole tab: Streamlit scrolls inside the page, so full_page alone cuts it.
    await page.set_viewport_size({"width": 1400, "height": 2400})
    for label in TABS:
        await open_tab(page, label)
        if label == "Status":
            await page.locator('[data-testid="stMetric"]').first.wait_for(timeout=60_000)
        if label == "Predictions":
            await page.locator(".st-key-prediction_status").wait_for(timeout=60_000)
        await page.wait_for_timeout(1500)
        await no_exception(page)
        await page.screenshot(path=str(SHOTS / f"{label.lower()}.png"), full_page=True)
    for label in TABS:
        assert (SHOTS / f"{label.lower()}.png").stat().st_size > 10_000, label


def test_the_playground_log_in_make_run_stays_readable(make_run: RunningStack) -> None:
    """After a session of chatting and stopping, the playground's lines in `make run`'s output are
    few, plain text and free of tracebacks."""
    lines = [line for line in make_run.output().splitlines() if re.match(r"^\S* *playground\s+\|", line)]
    text = "\n".join(lines)
    assert "Traceback" not in text, text
    assert "\x1b[" not in text, text
    assert len(lines) < 40, text
