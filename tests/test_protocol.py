"""The wire protocol as pure functions: parsing client frames and building events, no sockets."""
from __future__ import annotations

import json

import pytest

from voice import protocol as P
from voice.errors import ProtocolError


def code_of(data, *, started=True) -> str:
    with pytest.raises(ProtocolError) as info:
        P.parse_frame(data, started=started)
    return info.value.code


def test_session_start_parses_with_defaults():
    """A minimal session.start gives the rate asked for and no extras."""
    msg = P.parse_frame('{"type": "session.start", "sample_rate": 16000}', started=False)
    assert msg == P.SessionStart(sample_rate=16000)


@pytest.mark.parametrize("rate", P.INPUT_SAMPLE_RATES)
def test_every_supported_rate_is_accepted(rate):
    """Each documented input rate parses."""
    assert P.parse_frame(json.dumps({"type": "session.start", "sample_rate": rate}), started=False).sample_rate == rate


def test_session_start_optional_fields():
    """knowledge, steps and output_sample_rate are read and checked."""
    msg = P.parse_frame(json.dumps({"type": "session.start", "sample_rate": 48000, "knowledge": "  Open 9-5. ",
                                    "steps": 4, "output_sample_rate": 24000, "future_field": 1}), started=False)
    assert msg == P.SessionStart(sample_rate=48000, knowledge="Open 9-5.", steps=4, output_sample_rate=24000)
    assert code_of('{"type": "session.start", "sample_rate": 16000, "steps": 0}', started=False) == "bad_message"
    assert code_of('{"type": "session.start", "sample_rate": 16000, "knowledge": 5}', started=False) == "bad_message"
    assert code_of('{"type": "session.start", "sample_rate": 16000, "output_sample_rate": 11025}',
                   started=False) == "bad_sample_rate"


def test_session_start_canvas_and_deadline():
    """canvas (a bool) and deadline_ms (1 ms to 60 s) are read and checked; turn.canvas carries the draft."""
    msg = P.parse_frame('{"type": "session.start", "sample_rate": 16000, "canvas": true, "deadline_ms": 250}',
                        started=False)
    assert msg.canvas is True and msg.deadline_ms == 250
    for bad in ('"canvas": "yes"', '"deadline_ms": 0', '"deadline_ms": 60001', '"deadline_ms": 1.5'):
        assert code_of('{"type": "session.start", "sample_rate": 16000, %s}' % bad, started=False) == "bad_message"
    event = json.loads(P.turn_canvas(3, step=2, steps=8, cleaned="What ░░", reply="░░░", masked=5))
    assert event == {"type": "turn.canvas", "turn_id": 3, "step": 2, "steps": 8, "cleaned": "What ░░",
                     "reply": "░░░", "masked": 5}


@pytest.mark.parametrize("rate", [11025, 0, -16000, 16000.5, "16000", True, None])
def test_unsupported_sample_rate(rate):
    """Rates outside the list, and non-integers, are refused with the accepted list in the message."""
    with pytest.raises(ProtocolError) as info:
        P.parse_frame(json.dumps({"type": "session.start", "sample_rate": rate}), started=False)
    assert info.value.code == "bad_sample_rate"
    assert "16000" in info.value.message


def test_missing_sample_rate():
    """session.start without a rate says which field is needed."""
    with pytest.raises(ProtocolError) as info:
        P.parse_frame('{"type": "session.start"}', started=False)
    assert info.value.code == "bad_sample_rate" and "sample_rate" in info.value.message


def test_anything_before_session_start_is_refused():
    """Audio, text and input.end before session.start get not_started."""
    assert code_of(b"\x00\x00", started=False) == "not_started"
    assert code_of('{"type": "text", "text": "hi"}', started=False) == "not_started"
    assert code_of('{"type": "input.end"}', started=False) == "not_started"


def test_second_session_start():
    """A second session.start is refused, not applied."""
    assert code_of('{"type": "session.start", "sample_rate": 16000}') == "already_started"


def test_audio_frames():
    """Even-length PCM passes through; odd-length and oversized frames are refused."""
    assert P.parse_frame(b"\x01\x00\x02\x00", started=True) == P.Audio(b"\x01\x00\x02\x00")
    assert code_of(b"\x01\x00\x02") == "bad_audio"
    assert code_of(bytes(P.MAX_AUDIO_FRAME_BYTES + 2)) == "frame_too_large"
    assert P.parse_frame(bytes(P.MAX_AUDIO_FRAME_BYTES), started=True).pcm == bytes(P.MAX_AUDIO_FRAME_BYTES)


@pytest.mark.parametrize("data", ["{not json", "[1, 2]", '"text"', "", "\ud800"])
def test_malformed_json(data):
    """Text frames that are not JSON objects get bad_json."""
    assert code_of(data) == "bad_json"


def test_unknown_and_missing_type():
    """An unknown type names the known ones; a missing type is a bad message."""
    with pytest.raises(ProtocolError) as info:
        P.parse_frame('{"type": "dance"}', started=True)
    assert info.value.code == "unknown_type" and "session.start" in info.value.message
    assert code_of('{"text": "hi"}') == "bad_message"
    assert code_of('{"type": 7}') == "bad_message"


def test_text_turns():
    """Typed text is whitespace-normalised; empty, non-string and overlong text is refused."""
    assert P.parse_frame('{"type": "text", "text": "  hello \\n there "}', started=True) == P.TextTurn("hello there")
    assert code_of('{"type": "text", "text": "   "}') == "bad_message"
    assert code_of('{"type": "text", "text": 5}') == "bad_message"
    assert code_of(json.dumps({"type": "text", "text": "a" * (P.MAX_TEXT_CHARS + 1)})) == "bad_message"


def test_control_messages():
    """input.end and interrupt parse to their messages."""
    assert P.parse_frame('{"type": "input.end"}', started=True) == P.InputEnd()
    assert P.parse_frame('{"type": "interrupt"}', started=True) == P.Interrupt()


def test_oversized_text_frame():
    """A text frame past the limit is refused before it is parsed."""
    assert code_of(json.dumps({"type": "text", "text": "x" * P.MAX_TEXT_FRAME_BYTES})) == "frame_too_large"


def test_cleanup_requests():
    """/cleanup requests keep their id; bad ones say why, and carry the id for the reply when it was readable."""
    assert P.parse_cleanup('{"id": 7, "text": "um so yeah"}') == P.CleanupRequest(7, "um so yeah")
    assert P.parse_cleanup('{"text": "hi"}') == P.CleanupRequest(None, "hi")
    for bad, code in [('{"id": 1}', "bad_message"), ("nope", "bad_json"), (b"\x00", "bad_message"),
                      ('{"id": [1], "text": "x"}', "bad_message")]:
        with pytest.raises(ProtocolError) as info:
            P.parse_cleanup(bad)
        assert info.value.code == code
    with pytest.raises(ProtocolError) as info:
        P.parse_cleanup('{"id": "a-1", "text": ""}')
    assert info.value.request_id == "a-1"
    with pytest.raises(ProtocolError) as info:
        P.parse_cleanup("garbage")
    assert info.value.request_id is None


def test_events_are_compact_json_with_a_type():
    """Builders give one JSON object per event, None fields left out."""
    ready = json.loads(P.session_ready("abc", input_sample_rate=48000, output_sample_rate=22050, steps=8))
    assert ready == {"type": "session.ready", "session_id": "abc", "protocol": P.PROTOCOL_VERSION,
                     "input_sample_rate": 48000, "output_sample_rate": 22050, "steps": 8}
    assert json.loads(P.speech_stopped(1200)) == {"type": "vad.speech_stopped", "t_ms": 1200}
    assert json.loads(P.speech_stopped(1200, discarded=True))["discarded"] is True
    assert json.loads(P.error("bad_audio", "odd"))  == {"type": "error", "code": "bad_audio", "message": "odd"}
    assert json.loads(P.error("busy", "x", turn_id=3))["turn_id"] == 3
    assert P.parse_server_event(P.transcript_partial("héllo"))["text"] == "héllo"
    for build in (P.turn_cleaned, P.turn_reply, P.transcript_final):
        assert json.loads(build(2, "x"))["turn_id"] == 2


def test_turn_done_rounds_timings_and_keeps_nulls():
    """turn.done carries every timing (rounded to 0.1 ms) and voice_to_voice_ms, null when not measured."""
    done = json.loads(P.turn_done(4, timings={"asr_ms": 312.345, "llm_ms": 800.0}, voice_to_voice_ms=None))
    assert done == {"type": "turn.done", "turn_id": 4, "timings": {"asr_ms": 312.3, "llm_ms": 800.0},
                    "voice_to_voice_ms": None}
    assert json.loads(P.turn_done(4, timings={}, voice_to_voice_ms=1234.56))["voice_to_voice_ms"] == 1234.6


def test_cleanup_replies():
    """Cleanup results echo id and text; errors carry the id too."""
    assert json.loads(P.cleanup_result("r1", "um hi", "Hi.", ms=12.34)) == {
        "type": "cleanup.result", "id": "r1", "text": "um hi", "cleaned": "Hi.", "ms": 12.3}
    assert json.loads(P.cleanup_error(None, "bad_json", "x"))["id"] is None


def test_model_errors_map_to_codes():
    """Each model package's errors map to their protocol code."""
    from asr import TranscriptionError
    from dllm import EngineBusy, RequestError
    from tts import SynthesisError
    assert P.error_code_for(EngineBusy("full")) == "busy"
    assert P.error_code_for(RequestError("too long")) == "bad_turn"
    assert P.error_code_for(TranscriptionError("x")) == "asr_failed"
    assert P.error_code_for(SynthesisError("x", "s")) == "tts_failed"
    assert P.error_code_for(KeyError("x")) == "internal"


def test_server_events_are_records_whose_json_is_the_wire_text():
    """Each event is a frozen record; its to_json is exactly the text the builder of its name sends."""
    import dataclasses
    records_and_texts = [
        (P.SessionReady("s1", input_sample_rate=16000, output_sample_rate=24000, steps=8),
         '{"type":"session.ready","session_id":"s1","protocol":1,"input_sample_rate":16000,'
         '"output_sample_rate":24000,"steps":8}'),
        (P.SpeechStopped(900), '{"type":"vad.speech_stopped","t_ms":900}'),
        (P.TranscriptFinal(2, "héllo"), '{"type":"transcript.final","turn_id":2,"text":"héllo"}'),
        (P.AudioStart(2, 24000),
         '{"type":"audio.start","turn_id":2,"sample_rate":24000,"encoding":"pcm_s16le","channels":1}'),
        (P.TurnInterrupted(2, reason="barge_in", heard="Hi."),
         '{"type":"turn.interrupted","turn_id":2,"reason":"barge_in","heard":"Hi."}'),
        (P.TurnDone(2, timings={"asr_ms": 1.26}, voice_to_voice_ms=None),
         '{"type":"turn.done","turn_id":2,"timings":{"asr_ms":1.3},"voice_to_voice_ms":null}'),
        (P.Error("busy", "later"), '{"type":"error","code":"busy","message":"later"}'),
        (P.CleanupError(None, "bad_json", "x"), '{"type":"error","id":null,"code":"bad_json","message":"x"}'),
    ]
    for record, text in records_and_texts:
        assert record.to_json() == text
        with pytest.raises(dataclasses.FrozenInstanceError):
            record.type = "other"  # type: ignore[misc]
    assert P.turn_done(2, timings={"asr_ms": 1.26}, voice_to_voice_ms=None) == records_and_texts[5][1]
    assert P.cleanup_error(None, "bad_json", "x") == records_and_texts[-1][1]


def test_each_failure_is_a_voice_error_with_its_code_and_status():
    """A model package's error becomes the voice error for its failure (code, HTTP status, message, cause);
    anything else is internal and tells the client only its type."""
    from asr import TranscriptionError
    from dllm import EngineBusy, EngineClosed, RequestError
    from tts import SynthesisError

    from voice import errors as E
    for theirs, ours, code, status in [
        (EngineBusy("full"), E.Busy, "busy", 503), (RequestError("too long"), E.TurnRefused, "bad_turn", 400),
        (EngineClosed("gone"), E.TurnFailed, "llm_failed", 500),
        (TranscriptionError("x"), E.RecognitionFailed, "asr_failed", 500),
        (SynthesisError("x", "s"), E.SynthesisFailed, "tts_failed", 500),
    ]:
        err = E.as_voice_error(theirs)
        assert type(err) is ours and (err.code, err.status) == (code, status)
        assert err.message == str(theirs) and err.__cause__ is theirs
    bug = E.as_voice_error(KeyError("secret"))
    assert isinstance(bug, E.InternalError) and bug.code == "internal" and bug.message == "internal error (KeyError)"
    refused = ProtocolError("bad_audio", "odd")
    assert E.as_voice_error(refused) is refused and refused.status == 400
    assert E.NoRecognizer().code == "asr_failed" and E.TurnTimedOut("slow").status == 504


# ----- hostile input (issue 10's fuzz findings): a ProtocolError with a code, never another exception

HUGE = "9" * 401  # json parses it; float() of it overflows


@pytest.mark.parametrize("frame, code", [
    ('{"type": "session.start", "sample_rate": %s}' % HUGE, "bad_sample_rate"),
    ('{"type": "session.start", "sample_rate": 16000, "steps": %s}' % HUGE, "bad_message"),
    ('{"type": "session.start", "sample_rate": 16000, "deadline_ms": -%s}' % HUGE, "bad_message"),
    ('{"type": "session.start", "sample_rate": 16000, "output_sample_rate": %s}' % HUGE, "bad_sample_rate"),
    ("[" * 60_000, "bad_json"),
    ('{"a":' * 6_000 + "1" + "}" * 6_000, "bad_json"),
    ('{"type": "session.start", "sample_rate": 16000, "knowledge": "\\ud800"}', "bad_json"),
], ids=["huge-rate", "huge-steps", "huge-deadline", "huge-output-rate", "deep-array", "deep-object", "surrogate"])
def test_hostile_session_start(frame, code):
    """Huge integers, deep nesting and lone surrogates before session.start get a code, not a crash."""
    with pytest.raises(ProtocolError) as info:
        P.parse_frame(frame, started=False)
    assert info.value.code == code and len(info.value.message) < 300


def test_lone_surrogate_in_a_text_turn_is_refused():
    """A text turn holding "\\ud800" is refused before it can reach the history (it would poison every turn)."""
    assert code_of('{"type": "text", "text": "hi \\ud800 there"}') == "bad_json"
    assert code_of('{"type": "text", "text": "hi \\udc00"}') == "bad_json"
    assert P.parse_frame('{"type": "text", "text": "pair \\ud83d\\ude00 ok"}', started=True).text == "pair 😀 ok"


def test_hostile_cleanup_requests():
    """Surrogate ids, huge ids and oversized frames are refused; the reply's id is only ever a safe one."""
    cases = [('{"id": "\\ud800", "text": "hi"}', "bad_json", None),
             ('{"id": %s, "text": "hi"}' % HUGE, "bad_message", None),
             ('{"id": 1e999, "text": "hi"}', "bad_message", None),
             ('{"id": "ok", "text": "\\udfff"}', "bad_json", None),
             ('{"id": "ok", "text": "%s"}' % ("x" * P.MAX_TEXT_FRAME_BYTES), "frame_too_large", None),
             ('{"id": "ok", "text": 5}', "bad_message", "ok")]
    for frame, code, rid in cases:
        with pytest.raises(ProtocolError) as info:
            P.parse_cleanup(frame)
        assert (info.value.code, info.value.request_id) == (code, rid), frame[:60]
        json.loads(P.cleanup_error(info.value.request_id, info.value.code, info.value.message)).get("id")


def test_steps_bounded_by_the_servers_maximum():
    """session.start's steps above the server's max_steps is refused with the bound in the message."""
    start = '{"type": "session.start", "sample_rate": 16000, "steps": %d}'
    assert P.parse_frame(start % 12, started=False, max_steps=12).steps == 12
    with pytest.raises(ProtocolError) as info:
        P.parse_frame(start % 13, started=False, max_steps=12)
    assert info.value.code == "bad_message" and "12" in info.value.message
