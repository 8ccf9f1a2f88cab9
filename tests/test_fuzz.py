"""A short seeded fuzz (`voice.fuzz`) of /ws and /cleanup against a real server on the tiny model."""
from __future__ import annotations

import asyncio
import logging

import pytest
import pytest_asyncio
from conftest import make_tiny_engine

from voice import fuzz
from voice.server import ServerOptions, VoiceServer
from voice.services import Services

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server():
    server = VoiceServer(Services(make_tiny_engine(batch_window_ms=5.0), steps=2), ServerOptions(port=0))
    await server.start()
    yield server
    await server.close()


async def test_a_thousand_hostile_messages(server, caplog):
    """About 1,000 fuzzed frames: every connection answered or closed cleanly, no internal error, no traceback."""
    pytest.importorskip("hypothesis")
    caplog.set_level(logging.INFO)
    report = await asyncio.to_thread(fuzz.run, server.url, messages=1000, seed=0, timeout=30)
    assert report.messages >= 1000 and report.connections >= 100
    assert not report.problems, report.problems[:10]
    assert report.events["error:bad_json"] and report.events["error:frame_too_large"]
    bad = [f"{r.name}: {r.getMessage()[:120]}" for r in caplog.records
           if r.name != fuzz.CLIENT_LOG and (r.exc_info or r.levelno >= logging.ERROR)]
    assert not bad, bad[:10]
