"""Chat formats: how a model family marks turns in its prompt.

The turn format (`dllm.turn`) writes prompts through a `ChatFormat`, so the
same turn layout works for SmolLM2 (ChatML), LLaDA (Llama-3 headers) and
Dream (Qwen2's ChatML).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatFormat:
    name: str
    bos: str  # written once at the start of the prompt ("" if none)
    system_open: str
    user_open: str
    assistant_open: str
    close: str  # ends every message
    end_token: str  # the end-of-turn token; pads canvas fields

    def message(self, role: str, text: str) -> str:
        opener = {"system": self.system_open, "user": self.user_open, "assistant": self.assistant_open}[role]
        return f"{opener}{text}{self.close}"


CHATML = ChatFormat(
    name="chatml", bos="", system_open="<|im_start|>system\n", user_open="<|im_start|>user\n",
    assistant_open="<|im_start|>assistant\n", close="<|im_end|>\n", end_token="<|im_end|>",
)
# LLaDA's chat template: Llama-3 headers, but its own start token.
LLADA = ChatFormat(
    name="llada", bos="<|startoftext|>",
    system_open="<|start_header_id|>system<|end_header_id|>\n\n",
    user_open="<|start_header_id|>user<|end_header_id|>\n\n",
    assistant_open="<|start_header_id|>assistant<|end_header_id|>\n\n",
    close="<|eot_id|>", end_token="<|eot_id|>",
)
DREAM = CHATML  # Dream uses Qwen2's ChatML markers
