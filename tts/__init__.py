"""Speech out: piper synthesis, sentence chunking and resampling.

Knows nothing about the language model or the server; `voice` feeds it text
and plays what comes back.

    from tts import Synthesizer, split_sentences, resample
    synth = Synthesizer.load()
    for chunk in synth.synthesize("Hello there. How can I help?"):
        ...  # int16 mono at synth.sample_rate, one sentence per chunk
"""
from __future__ import annotations

from .audio import RESAMPLE_QUALITY, float_to_pcm16, pcm16_to_float, resample
from .errors import SynthesisError, TTSError, VoiceLoadError
from .synth import Synthesizer, SynthesizerOptions
from .text import SentenceBuffer, lead_clause, split_sentences

__all__ = [
    "Synthesizer",
    "SynthesizerOptions",
    "TTSError",
    "VoiceLoadError",
    "SynthesisError",
    "split_sentences",
    "lead_clause",
    "SentenceBuffer",
    "resample",
    "pcm16_to_float",
    "float_to_pcm16",
    "RESAMPLE_QUALITY",
]
