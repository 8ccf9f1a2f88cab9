"""voice: a streaming voice assistant whose replies come from a masked diffusion LM.

This package wires `asr` (VAD, Whisper), `dllm` (the diffusion LM turn) and
`tts` (piper) into sessions, and serves them:

    from voice import Services, VoiceServer, ServerOptions
    services = Services.load()                       # the packaged models (seconds)
    server = VoiceServer(services, ServerOptions(port=8765))
    await server.start()                             # /ws, /cleanup, /v1/..., /metrics, GET /

Entry points: `voice serve | kiosk | respond | cleanup` (`voice.cli`), and
`python -m voice.bench | voice.fuzz | voice.soak`. The wire protocol is
`voice.protocol` and docs/protocol.md; who may connect is `voice.access`, the
per-connection pacing `voice.limits`. `voice.cluster` runs the models as Ray
Serve deployments behind front ends (`voice serve --ray`, deploy/serve.yaml;
optional: `pip install 'voice[ray]'`). Nothing else imports this package.
"""
from __future__ import annotations

from .errors import DeviceError, ProtocolError, ServiceLoadError, VoiceError
from .server import ServerOptions, VoiceServer
from .services import ModelOptions, Services
from .session import SessionConfig, VoiceSession

__all__ = [
    "Services", "ModelOptions", "VoiceSession", "SessionConfig", "VoiceServer", "ServerOptions",
    "VoiceError", "ProtocolError", "DeviceError", "ServiceLoadError",
]
