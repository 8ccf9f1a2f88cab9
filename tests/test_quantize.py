"""int8 canvas steps (dllm.quantize): smoothing keeps the function, and makes int8 closer to it."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_tiny_engine
from dllm import RequestError, Turn, place
from dllm.quantize import channel_max, int8_copy, make_int8, smooth


def outlier_model():
    """The tiny random model with a few input channels a hundred times larger than the rest, as SmolLM2 has."""
    engine = make_tiny_engine()
    model = engine.model
    with torch.no_grad():
        for layer in model.layers:
            layer.attn_norm.weight[:3] *= 100
            layer.mlp_norm.weight[5:7] *= 100
        model.norm.weight[:2] *= 50
    return model


def run(model, tokens):
    with torch.no_grad():
        return model(tokens, prefix_len=tokens.shape[1] // 2)


def test_smoothing_keeps_the_function_and_helps_int8():
    torch.manual_seed(0)
    model = outlier_model()
    tokens = torch.randint(0, 500, (2, 24))
    before = run(model, tokens)
    plain_int8_error = (run(int8_copy(model), tokens) - before).abs().mean()
    smoothed = copy.deepcopy(model)
    smooth(smoothed, channel_max(smoothed, lambda: run(smoothed, tokens)))
    after = run(smoothed, tokens)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert not torch.equal(smoothed.layers[0].attn.q_proj.weight, model.layers[0].attn.q_proj.weight)
    smoothed_int8_error = (run(int8_copy(smoothed), tokens) - before).abs().mean()
    assert smoothed_int8_error < 0.5 * plain_int8_error, (smoothed_int8_error, plain_int8_error)


def test_int8_copy_fuses_products_that_share_an_input_without_changing_them():
    """q, k, v and gate, up run as one product each; their input's int8 scale is shared, so nothing changes."""
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    torch.manual_seed(0)
    model = outlier_model()
    tokens = torch.randint(0, 500, (2, 24))
    fused = int8_copy(model)
    assert fused.layers[0].attn.qkv_proj is not None and not hasattr(fused.layers[0].attn, "q_proj")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        separate = quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                    dtype=torch.qint8)
    torch.testing.assert_close(run(fused, tokens), run(separate, tokens), rtol=1e-5, atol=1e-5)


def test_int8_engine_runs_the_canvas_in_int8_and_the_prompt_in_float32():
    engine = make_tiny_engine()
    make_int8(engine)
    assert engine.model.lm_head.weight.dtype == torch.float32
    assert "quantized" in type(engine.canvas_model.lm_head).__module__
    out = engine.respond_sync(Turn("hello there"))
    assert out.ms > 0 and engine.forward_calls > 0


def test_precision_errors_name_the_choices():
    with pytest.raises(RequestError, match="precision must be one of"):
        place(None, "cpu", "int4")  # checked before anything is placed
    with pytest.raises(RequestError, match="for the CPU"):
        place(None, "cuda", "int8")
