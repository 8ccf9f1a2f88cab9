"""Speech in: voice activity detection with endpointing, and transcription.

Knows nothing about the language model or the server; `voice` feeds it PCM
and passes the text on.

    from asr import VAD, SpeechStopped, Transcriber
    vad, asr = VAD(), Transcriber.load()
    for event in vad.feed(pcm16_bytes):
        if isinstance(event, SpeechStopped):
            text = asr.transcribe(event.audio)  # blocking: run it in a thread
"""
from __future__ import annotations

from .errors import ASRError, AudioFormatError, ModelLoadError, TranscriptionError
from .transcribe import SAMPLE_RATE, Transcriber, TranscriberOptions
from .turn_end import looks_finished
from .vad import (VAD, SpeechDiscarded, SpeechPaused, SpeechResumed, SpeechStarted, SpeechStopped, VADEvent,
                  VADOptions)

__all__ = [
    "VAD",
    "VADOptions",
    "VADEvent",
    "SpeechStarted",
    "SpeechStopped",
    "SpeechDiscarded",
    "SpeechPaused",
    "SpeechResumed",
    "looks_finished",
    "Transcriber",
    "TranscriberOptions",
    "SAMPLE_RATE",
    "ASRError",
    "AudioFormatError",
    "ModelLoadError",
    "TranscriptionError",
]
