"""The extension in real headless Chromium, talking to the real host and the real model.

The unpacked extension (``extension/``) is loaded into a fresh profile, the host manifest is
installed into that profile with ``tabagent-server native install --profile-dir``, and the side
panel page is driven over the DevTools protocol (``tests/browser.py``): it connects through
``chrome.runtime.connectNative``, streams a chat from SmolLM2, keeps the conversation in the
server's memory, attaches the text of a page, and stops a long answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tabagent.native_messaging.manifest import DEV_EXTENSION_ID
from tests.browser import Page, chromium
from tests.helpers import SERVER_BIN

pytestmark = pytest.mark.browser

EXTENSION_DIR = Path(__file__).parents[1] / "extension"
PANEL_URL = f"chrome-extension://{DEV_EXTENSION_ID}/sidepanel.html"
ARTICLE = """<!doctype html><html><head><title>Otters of Lake Wobegon</title></head><body>
<nav>Home | About | Contact</nav>
<article><h1>Otters of Lake Wobegon</h1>
<p>The purple otter colony of Lake Wobegon eats mostly marzipan and sleeps in teacups.</p>
</article></body></html>"""

# Counts the changes of the newest assistant message's text while it streams.
WATCH_STREAM = """
(() => {
  window.__updates = 0;
  new MutationObserver(() => {
    const last = [...document.querySelectorAll('#messages .message.assistant')].pop();
    if (last && last.dataset.state === 'streaming') window.__updates++;
  }).observe(document.getElementById('messages'),
             {subtree: true, childList: true, characterData: true});
  return true;
})()
"""
LAST_ASSISTANT = """
(() => {
  const last = [...document.querySelectorAll('#messages .message.assistant')].pop();
  return last ? {state: last.dataset.state, text: last.querySelector('.text')?.textContent ?? ''}
              : null;
})()
"""


def install_host(profile: Path) -> None:
    result = subprocess.run(
        [SERVER_BIN, "native", "install", "--profile-dir", str(profile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture
async def article_url() -> AsyncIterator[str]:
    async def page(_: web.Request) -> web.Response:
        return web.Response(text=ARTICLE, content_type="text/html")

    app = web.Application()
    app.router.add_get("/otters", page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/otters"
    await runner.cleanup()


async def wait_connection(page: Page, state: str, what: str) -> None:
    await page.wait_for(
        "document.body?.dataset.connection ?? ''", lambda v: v == state, within=60, what=what
    )


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return True
    return state == "Z"  # exited; its parent (Chromium) has not reaped it yet


async def host_exits(pid: int, within: float) -> bool:
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        if gone(pid):
            return True
        await asyncio.sleep(0.2)
    return False


async def send_prompt(page: Page, text: str, max_tokens: int = 128) -> None:
    """Type ``text`` and press Send, with the panel's answer length set to ``max_tokens``."""
    await page.evaluate(
        f"""(() => {{
          const length = document.getElementById('max-tokens');
          length.value = '{max_tokens}';
          length.dispatchEvent(new Event('change', {{bubbles: true}}));
          const prompt = document.getElementById('prompt');
          prompt.value = {json.dumps(text)};
          prompt.dispatchEvent(new Event('input', {{bubbles: true}}));
          document.getElementById('send').click();
          return true;
        }})()"""
    )


async def wait_answer(page: Page, states: tuple[str, ...], within: float = 120) -> dict[str, Any]:
    answer: dict[str, Any] = await page.wait_for(
        LAST_ASSISTANT,
        lambda v: bool(v) and v["state"] in states,
        within=within,
        what=f"the assistant's answer to reach {states}",
    )
    return answer


@pytest.mark.timeout(300)  # three generations on a 2-core CI machine, with Chromium beside them
async def test_side_panel_chats_through_the_native_host(article_url: str) -> None:
    env = dict(os.environ)  # the isolated HOME/XDG folders: the host Chromium starts uses them
    async with chromium(
        extra_args=[f"--load-extension={EXTENSION_DIR}"], prepare_profile=install_host, env=env
    ) as browser:
        article = await browser.new_page()
        await article.goto(article_url)
        await article.wait_for("document.readyState", lambda v: v == "complete", what="article")

        page = await browser.new_page()
        await page.goto(PANEL_URL)
        try:
            await wait_connection(page, "connected", "the panel connecting to the native host")
            hello = await page.evaluate("globalThis.tabagent.request('session.hello', {})")
            assert hello["mode"] == "in-process"
            models = await page.wait_for(
                "[...document.querySelectorAll('#model option')].map(o => o.value)",
                lambda v: "smollm2-135m-instruct" in v,
                what="the model picker listing the default chat model",
            )
            assert "all-minilm-l6-v2" not in models  # chat models only

            # a streamed answer, one DOM update per delta
            await page.evaluate(WATCH_STREAM)
            await send_prompt(page, "Say hello to the otters.")
            answer = await wait_answer(page, ("done", "error"))
            assert answer["state"] == "done", page.report()
            assert answer["text"].strip()
            assert await page.evaluate("window.__updates") >= 2  # streamed, not all at once

            # the conversation lives in the server's memory, not the browser
            conv_id = await page.wait_for(
                "document.getElementById('conversations').value",
                bool,
                what="the new conversation selected",
            )
            stored = await page.evaluate(
                f"globalThis.tabagent.request('conversations.messages', {{id: '{conv_id}'}})"
            )
            roles = [m["role"] for m in stored["data"]]
            assert roles == ["user", "assistant"]
            assert stored["data"][0]["content"] == "Say hello to the otters."
            assert stored["data"][1]["content"].strip() == answer["text"].strip()

            # "use this page": the article's readable text goes into the next turn
            await page.evaluate("document.getElementById('use-page').click(), true")
            await page.wait_for(
                "document.body.dataset.page ?? ''",
                lambda v: v == article_url,
                what="the page text captured",
            )
            await send_prompt(page, "What do the otters eat?")
            assert (await wait_answer(page, ("done", "error")))["state"] == "done"
            stored = await page.evaluate(
                f"globalThis.tabagent.request('conversations.messages', {{id: '{conv_id}'}})"
            )
            with_page = stored["data"][2]["content"]
            assert "marzipan" in with_page  # the article's text
            assert "Home | About" not in with_page  # not the navigation around it
            assert with_page.rstrip().endswith("What do the otters eat?")

            # stop a long answer mid-stream
            await send_prompt(page, "Write a very long epic poem about otters.", max_tokens=2048)
            await wait_answer(page, ("streaming",), within=60)
            await page.wait_for(
                "document.getElementById('stop').disabled", lambda v: v is False, what="stop"
            )
            await page.evaluate("document.getElementById('stop').click(), true")
            stopped = await wait_answer(page, ("cancelled", "done", "error"), within=30)
            assert stopped["state"] == "cancelled", page.report()

            # the host dies (a crash, an update): the panel says so, and reconnects by itself
            os.kill(hello["pid"], signal.SIGKILL)
            await wait_connection(page, "disconnected", "the panel noticing the host is gone")
            assert "isconnected" in await page.evaluate(
                "document.getElementById('status').textContent"
            )
            await wait_connection(page, "connected", "the panel reconnecting to a new host")
            again = await page.evaluate("globalThis.tabagent.request('session.hello', {})")
            assert again["pid"] != hello["pid"]
            listed = await page.evaluate(
                f"globalThis.tabagent.request('conversations.messages', {{id: '{conv_id}'}})"
            )
            assert len(listed["data"]) >= 4  # nothing acknowledged was lost with the host

            assert not page.errors, page.report()

            # with no panel open the host is let go (so a server started later gets the
            # databases): it exits after the idle delay
            await page.goto("about:blank")
            assert await host_exits(again["pid"], within=45), "the idle host kept running"
        except AssertionError:
            print("".join(browser.log))  # Chromium's stderr, the host's included
            raise
