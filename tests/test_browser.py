"""The page in real headless Chromium, with a WAV of piper speech as the fake microphone.

Chromium (Debian's, driven by playwright; no browser download) captures the
WAV through getUserMedia, the page's AudioWorklet sends it as PCM16 to /ws,
and the page shows the transcript and reply and plays the reply audio. The
page exposes counters on `window.voiceStats` for these checks.

With the real dLLM the reply may be empty (an untrained adapter writes
nothing), so that test checks that playback happened if and only if reply
audio arrived; the scripted-engine test then checks playback and the Stop
button on a reply that is known to be spoken.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from voice_helpers import QUESTION, ScriptedEngine, fresh_engine, speech, synthesizer, \
    transcriber, words

from voice.audio import write_wav
from voice.server import ServerOptions, VoiceServer
from voice.services import Services

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--use-fake-ui-for-media-stream",
         "--use-fake-device-for-media-stream", "--autoplay-policy=no-user-gesture-required"]


@pytest.fixture(scope="module")
def mic_wav(tmp_path_factory) -> Path:
    """The question, then enough silence that Chromium's looping of the file does not start a second turn soon."""
    pcm = np.concatenate([speech(QUESTION, lead_s=0.5, tail_s=0.0), np.zeros(16000 * 20, np.int16)])
    path = tmp_path_factory.mktemp("mic") / "question.wav"
    write_wav(path, pcm, 16000)
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser(mic_wav):
    playwright_api = pytest.importorskip("playwright.async_api")
    executable = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    if executable is None:
        pytest.skip("no Chromium installed (apt install chromium)")
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=executable,
                                          args=[*FLAGS, f"--use-file-for-fake-audio-capture={mic_wav}"])
        yield browser
        await browser.close()


@pytest.fixture(scope="module")
def engine_base(base_engine):
    """The packaged dLLM (conftest's session-wide `base_engine`)."""
    return base_engine


async def serve(engine) -> VoiceServer:
    server = VoiceServer(Services(engine, transcriber(), synthesizer()), ServerOptions(port=0))
    await server.start()
    return server


async def stats(page) -> dict:
    return await page.evaluate("() => JSON.parse(JSON.stringify(window.voiceStats))")


async def wait_for(page, predicate, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = await stats(page)
        if predicate(s):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; page stats: {s}")
        await asyncio.sleep(0.25)


async def open_page(browser, server: VoiceServer):
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    await page.goto(f"http://127.0.0.1:{server.port}/")
    await page.click("#start")
    return page, errors


async def test_page_talks_to_the_real_model(browser, engine_base):
    """The fake mic's question is transcribed on the page, a reply arrives, and audio plays iff it was sent."""
    server = await serve(fresh_engine(engine_base))
    page, errors = await open_page(browser, server)
    try:
        s = await wait_for(page, lambda s: s["turnsDone"] >= 1, 180, "turn.done")
        you = await page.inner_text(".turn .you")
        assert {"library", "saturday"} <= set(words(you)), you
        assert "turn.reply" in s["events"] and s["framesSent"] > 50 and s["micOn"]
        assert s["canvases"] == server.services.steps  # the draft, step by step, before the reply
        assert await page.locator(".turn.draft").count() == 0
        reply = await page.inner_text(".turn .reply")
        assert reply  # the reply text, or "(no reply)" for an empty one
        if s["audioChunksReceived"]:
            s = await wait_for(page, lambda s: s["audioChunksPlayed"] > 0, 30, "playback")
        else:
            assert reply == "(no reply)" and s["audioChunksScheduled"] == 0
        assert "voice→voice" in await page.inner_text(".turn .latency") or not s["audioChunksReceived"]
        assert not errors, errors
    finally:
        await page.close()
        await server.close()


async def test_page_plays_the_reply_and_stop_flushes_it(browser):
    """With a known spoken reply the page shows it, plays its audio and the Stop button flushes playback."""
    reply = "The library opens at nine. It closes at five. On Sundays it opens at noon and closes at four."
    server = await serve(ScriptedEngine(reply=reply))
    page, errors = await open_page(browser, server)
    try:
        s = await wait_for(page, lambda s: s["audioChunksPlayed"] >= 2, 120, "reply playback")
        assert await page.inner_text(".turn .reply") == reply
        assert {"library", "saturday"} <= set(words(await page.inner_text(".turn .you")))
        await wait_for(page, lambda s: s["turnsDone"] >= 1, 30, "turn.done")
        assert "voice→voice" in await page.inner_text(".turn .latency")
        # A typed question whose reply is stopped while it plays.
        await page.fill("#text", "and on sundays")
        await page.press("#text", "Enter")
        await wait_for(page, lambda s: s["events"].count("audio.start") >= 2, 60, "the second reply's audio")
        await page.click("#stop")
        s = await wait_for(page, lambda s: "turn.interrupted" in s["events"], 30, "turn.interrupted")
        assert s["audioFlushes"] >= 1
        assert not errors, errors
    finally:
        await page.close()
        await server.close()
