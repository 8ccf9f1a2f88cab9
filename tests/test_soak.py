"""`voice.soak` for a few seconds: two sessions speaking real questions beside a cleanup flood (scripted dLLM)."""
from __future__ import annotations

import pytest
from voice_helpers import ScriptedEngine, synthesizer, transcriber

from voice.bench import speak_questions
from voice.server import ServerOptions, VoiceServer
from voice.services import Services
from voice.session import SessionConfig
from voice.soak import report, run_soak

pytestmark = pytest.mark.asyncio


async def test_short_soak_loses_no_turn():
    """Two sessions for 20 s beside one /cleanup flood: turns complete, none lost, cleanups answered."""
    services = Services(ScriptedEngine(reply="It opens at nine."), transcriber(), synthesizer())
    server = VoiceServer(services, ServerOptions(port=0, session=SessionConfig(partial_every_ms=0)))
    await server.start()
    try:
        result = await run_soak(server.url, speak_questions(2), sessions=2, minutes=1 / 3, flood=1,
                                flood_inflight=4, timeout=60)
    finally:
        await server.close()
    assert result.done >= 2 and not result.lost, report(result, True)
    assert result.cleanups > 0 and result.cleanup_errors == 0
    assert len(result.voice_to_voice_ms) == result.done
    assert result.rss_warm_mb is not None and result.rss_end_mb is not None  # warm after each session's first turn
