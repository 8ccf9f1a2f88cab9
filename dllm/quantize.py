"""int8 weights for CPUs without fast bf16 (an AVX2-only CPU: a kiosk box, a cheap cloud core).

There PyTorch runs bf16 matrix products about 50x slower than float32, so the model runs in float32, and
fbgemm's dynamic-quantized linear (int8 weights with a scale per output row, int8 activations with one scale
per call) runs each product 2.4x to 3.3x faster still (docs/BENCHMARKS.md).

One scale for a whole call's activations loses small channels next to large ones, and SmolLM2 has channels
hundreds of times larger than the rest. So, as SmoothQuant does (Xiao et al. 2023), each linear layer's input
channels are first divided by a scale folded into what comes before (the RMSNorm weight, the value rows, the
up-projection rows) and its weights multiplied by the same scale: the float32 model computes the same
function, and the int8 one loses far less. The scales come from the channels' largest values over a few
turns run when the model loads (`channel_max`, `CALIBRATION_TURNS`).

The engine runs the prompt with the smoothed float32 model (its first tokens carry the largest activations,
and it runs once per turn) and the canvas steps with the int8 copy (`make_int8`).
"""
from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor, nn

from .model import Transformer
from .turn import Turn

log = logging.getLogger(__name__)

# How much of an input channel's range moves into the weights (0: none, 1: all). On the eval's conversational
# rows 0.4 and 0.8 came within one of float32's 100 and 0.6 lost 7 (docs/MODEL_CARD.md): kept at 0.4.
ALPHA = 0.4
CALIBRATION_STEPS = 2  # a pass of 2 steps sees an all-masked canvas and a half-written one: 3 s, not 14 at K = 8
# Turns whose canvas steps measure the channels' ranges: cleanup, a card question, small talk. Written for this,
# apart from every eval set.
CALIBRATION_CLEANUP = (
    "um so i was uh wondering if the the pool is open on sunday mornings",
    "yeah i need to to change my booking from tuesday no sorry from thursday to friday",
    "the package came in but the the box was like totally crushed",
)
CALIBRATION_TURNS = (
    Turn("uh how much is a a ticket for kids", knowledge="Riverside Cinema. Tickets 9 dollars, children 5 dollars. "
         "Films at 4, 7 and 9:30 pm. Parking behind the building."),
    Turn("hey good morning how are you"),
    Turn("can you order me a pizza"),
    Turn("what is the tallest mountain in the world"),
)


def channel_max(model: Transformer, run: Callable[[], object]) -> dict[str, Tensor]:
    """The largest |value| of each input channel of every linear layer while `run()` runs the model."""
    seen: dict[str, Tensor] = {}

    def hook(name: str):
        def record(_module, inputs, _output) -> None:
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1]).abs().amax(0)
            seen[name] = torch.maximum(seen[name], x) if name in seen else x
        return record
    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return seen


def _scale(act: Tensor, weight_max: Tensor, alpha: float) -> Tensor:
    """Per input channel: its activations' range to the power alpha over its weights' to the power 1 - alpha."""
    return (act.clamp(min=1e-5) ** alpha / weight_max.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)


def _column_max(*weights: Tensor) -> Tensor:
    """Each input channel's largest |weight| over the given (out, in) matrices."""
    return torch.stack([w.abs().amax(0) for w in weights]).amax(0)


@torch.no_grad()
def smooth(model: Transformer, act: dict[str, Tensor], alpha: float = ALPHA) -> None:
    """Move input-channel ranges from activations into weights, in place; the function is unchanged.
    `act`: `channel_max` of this model. Unties the LM head from the embedding (its input is smoothed)."""
    cfg = model.cfg
    group = cfg.n_heads // cfg.n_kv_heads
    for i, layer in enumerate(model.layers):
        at, mlp, p = layer.attn, layer.mlp, f"layers.{i}."
        s = _scale(act[p + "attn.q_proj"], _column_max(at.q_proj.weight, at.k_proj.weight, at.v_proj.weight), alpha)
        layer.attn_norm.weight /= s
        for lin in (at.q_proj, at.k_proj, at.v_proj):
            lin.weight *= s
        # o_proj's input channel (head h, dim d) is a mix of value channel (h // group, d): one scale per value
        # channel, shared by the query heads of its group.
        by_value = lambda x: x.view(cfg.n_kv_heads, group, cfg.head_dim).amax(1)  # noqa: E731
        s = _scale(by_value(act[p + "attn.o_proj"]), by_value(_column_max(at.o_proj.weight)), alpha)  # (Hkv, D)
        at.v_proj.weight /= s.reshape(-1, 1)
        if at.v_proj.bias is not None:
            at.v_proj.bias /= s.reshape(-1)
        at.o_proj.weight *= s[:, None, :].expand(-1, group, -1).reshape(-1)
        s = _scale(act[p + "mlp.gate_proj"], _column_max(mlp.gate_proj.weight, mlp.up_proj.weight), alpha)
        layer.mlp_norm.weight /= s
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight *= s
        s = _scale(act[p + "mlp.down_proj"], _column_max(mlp.down_proj.weight), alpha)
        mlp.up_proj.weight /= s[:, None]  # silu(gate) * up: scaling up's output scales the product
        mlp.down_proj.weight *= s
    s = _scale(act["lm_head"], _column_max(model.lm_head.weight), alpha)
    model.lm_head.weight = nn.Parameter(model.lm_head.weight * s)
    model.norm.weight /= s


def _fused(*linears: nn.Linear) -> nn.Linear:
    """One linear layer computing the given ones side by side (their outputs concatenated)."""
    bias = linears[0].bias is not None
    out = nn.Linear(linears[0].in_features, sum(x.out_features for x in linears), bias=bias)
    with torch.no_grad():
        out.weight.copy_(torch.cat([x.weight for x in linears]))
        if bias:
            out.bias.copy_(torch.cat([x.bias for x in linears]))
    return out


def int8_copy(model: Transformer) -> Transformer:
    """A copy whose linear layers and LM head are fbgemm dynamic-quantized int8 (per-row weight scales), with
    q, k, v and gate, up fused into one product each: they share their input, so its int8 scale is the same,
    the results are identical, and two calls instead of five cost 0.56x at 4 positions (docs/BENCHMARKS.md)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    if next(model.parameters()).dtype != torch.float32 or next(model.parameters()).device.type != "cpu":
        raise ValueError("int8 weights need a float32 model on the CPU")
    model = copy.deepcopy(model)
    for layer in model.layers:
        at, mlp = layer.attn, layer.mlp
        at.qkv_proj = _fused(at.q_proj, at.k_proj, at.v_proj)
        mlp.gate_up_proj = _fused(mlp.gate_proj, mlp.up_proj)
        del at.q_proj, at.k_proj, at.v_proj, mlp.gate_proj, mlp.up_proj
    with warnings.catch_warnings():  # torch.ao marks its eager API as moving to torchao; torch 2.13 is pinned
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8,
                                inplace=True).eval()


def make_int8(engine) -> None:
    """Give `engine` (float32, CPU) int8 canvas steps: measure the canvas steps' channel ranges on the
    calibration turns, smooth the float32 model with them (the prompt keeps running it), and quantize a copy
    of it for the canvas (`Engine.canvas_model`). Seconds: a few turns run in float32."""
    probe = copy.deepcopy(engine.model)  # hooked apart from the prompt's model: the canvas's ranges only
    engine.canvas_model = probe
    sampler = replace(engine.options.sampler, steps=CALIBRATION_STEPS)
    try:
        act = channel_max(probe, lambda: (
            engine.run([engine.encode(Turn(t), with_reply=False) for t in CALIBRATION_CLEANUP], sampler),
            engine.run([engine.encode(t) for t in CALIBRATION_TURNS], sampler)))
    finally:
        engine.canvas_model = engine.model
    del probe
    smooth(engine.model, act)
    engine._heads.clear()  # keys and values of the unsmoothed model: the values' channels have been rescaled
    engine.canvas_model = int8_copy(engine.model)
    log.info("int8 canvas steps ready (SmoothQuant alpha %.2f, %d calibration turns)", ALPHA,
             len(CALIBRATION_CLEANUP) + len(CALIBRATION_TURNS))
