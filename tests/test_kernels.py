"""Each Triton kernel against its PyTorch reference.

On the CPU the kernels run in Triton's interpreter (float32 and float16 only:
the interpreter mishandles bfloat16), at small sizes because it is slow. The
same checks run compiled on CUDA, with bfloat16 and realistic vocabularies,
when a GPU is present, and skip with a reason otherwise.

Triton fixes its mode when it is first imported (see kernels.dispatch), so
TRITON_INTERPRET=1 is set at the top of this module, before anything here
imports triton, on machines without CUDA. Where that cannot work (a GPU run,
which must compile; or another test module imported triton first), the
interpreter tests skip here and `test_cpu_kernels_in_child_process` runs them
in a fresh Python with the variable set from the start. `kernels` itself does
not import triton until a kernel is first used, and never for CPU tensors
under backend="auto".
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # `import torch` does not import triton
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import kernels  # noqa: E402
from dllm.model import apply_rope as model_apply_rope  # noqa: E402
from dllm.model import rms_norm as model_rms_norm  # noqa: E402
from dllm.model import rope_tables  # noqa: E402
from kernels import Confidence, KernelError  # noqa: E402
from kernels.dispatch import interpreter_enabled, library_interpreted, triton_available, use_triton  # noqa: E402

INTERP = triton_available() and library_interpreted()
interp = pytest.mark.skipif(
    not INTERP,
    reason="triton is compiling in this process (a GPU run, or imported before TRITON_INTERPRET=1 was set); "
           "test_cpu_kernels_in_child_process runs the interpreter tests",
)
HAS_CUDA = torch.cuda.is_available() and triton_available() and not INTERP
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and triton (the compiled kernels)")
DTYPES_CPU = [torch.float32, torch.float16]
DTYPES_CUDA = [torch.float32, torch.float16, torch.bfloat16]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def tol(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]


def poisoned_confidence(n: int, device: str) -> Confidence:
    """Outputs full of values no kernel would write, to catch unwritten rows."""
    nan = torch.full((n,), float("nan"), device=device)
    return Confidence(torch.full((n,), -1, dtype=torch.int64, device=device), nan.clone(), nan.clone(), nan.clone())


def assert_all_written(out: Confidence) -> None:
    assert (out.token >= 0).all(), "a token was not written"
    for name in ("prob", "margin", "entropy"):
        assert torch.isfinite(getattr(out, name)).all(), f"{name} was not written everywhere"


def assert_confidence_close(out: Confidence, ref: Confidence, dtype: torch.dtype) -> None:
    assert out.token.dtype == torch.int64
    assert all(t.dtype == torch.float32 for t in out[1:])
    for name in ("prob", "margin", "entropy"):
        err = rel_err(getattr(out, name), getattr(ref, name))
        assert err < tol(dtype), f"{name}: relative error {err:.2e}"


def random_logits(n: int, v: int, dtype: torch.dtype, device: str, gen: torch.Generator) -> torch.Tensor:
    # A spread like real logits: most mass on a few tokens, a long flat tail.
    x = torch.randn(n, v, generator=gen) * 3.0
    x[:, :7] += 4.0 * torch.rand(n, 7, generator=gen)
    return x[:, torch.randperm(v, generator=gen)].to(dtype).to(device)


def gumbel(n: int, v: int, device: str, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(n, v, generator=gen).clamp(1e-10, 1 - 1e-7)
    return (-torch.log(-torch.log(u))).to(device)


# ---------------------------------------------------------------- confidence

CONF_CASES = [
    # (N, V, block_v, splits): several vocabulary tiles, a ragged last tile,
    # one or several vocabulary chunks merged by the second kernel.
    (5, 1000, 256, 1),
    (37, 4099, 1024, 3),
]


@interp
@pytest.mark.parametrize("n,v,block_v,splits", CONF_CASES)
@pytest.mark.parametrize("dtype", DTYPES_CPU)
def test_confidence_interp_matches_reference(n, v, block_v, splits, dtype):
    """The one-pass confidence kernel matches the torch reference, with and without temperature and noise."""
    gen = torch.Generator().manual_seed(n * v)
    logits = random_logits(n, v, dtype, "cpu", gen)
    noise = gumbel(n, v, "cpu", gen)
    for temperature, z in ((1.0, None), (0.7, noise)):
        ref = kernels.confidence_torch(logits, temperature=temperature, noise=z)
        out = kernels.confidence_triton(logits, temperature=temperature, noise=z, block_v=block_v,
                                        splits=splits, out=poisoned_confidence(n, "cpu"))
        assert_all_written(out)
        # Same float32 logits and noise in both paths, so the argmax is exact.
        assert torch.equal(out.token, ref.token)
        assert_confidence_close(out, ref, dtype)


@interp
@pytest.mark.parametrize("splits", [1, 4])
def test_confidence_interp_ties_pick_first_index(splits):
    """On tied maxima the kernel picks the first index, as torch.argmax does, across tiles and chunks."""
    gen = torch.Generator().manual_seed(7)
    logits = torch.randint(0, 4, (9, 1000), generator=gen).float()  # many exact ties at the max
    logits[3, 900] = 10.0  # a lone maximum in the last tile
    logits[4] = 1.0  # a flat row: token 0, margin 0, entropy log V
    ref = kernels.confidence_torch(logits)
    out = kernels.confidence_triton(logits, block_v=128, splits=splits)
    assert torch.equal(out.token, ref.token)
    assert out.margin[4] == 0 and abs(out.entropy[4].item() - torch.log(torch.tensor(1000.0)).item()) < 1e-5
    assert_confidence_close(out, ref, torch.float32)


def test_confidence_reference_definitions():
    """The torch reference computes what the docs say, on a hand-checkable row."""
    logits = torch.tensor([[0.0, 2.0, 1.0, float("-inf")]])
    p = torch.softmax(logits, -1)[0]
    ref = kernels.confidence_torch(logits)
    assert ref.token.item() == 1
    assert ref.prob.item() == pytest.approx(p[1].item())
    assert ref.margin.item() == pytest.approx((p[1] - p[2]).item())
    assert ref.entropy.item() == pytest.approx(-(p[:3] * p[:3].log()).sum().item())
    noisy = kernels.confidence_torch(logits, noise=torch.tensor([[5.0, 0.0, 0.0, 0.0]]))
    assert noisy.token.item() == 0 and noisy.prob.item() == pytest.approx(p[0].item())
    assert noisy.margin.item() == pytest.approx(ref.margin.item())  # scores use the clean p


@interp
def test_confidence_interp_minus_inf_logits():
    """Logits of -inf (banned tokens) count as probability 0 and do not poison the sums."""
    logits = torch.randn(6, 300)
    logits[:, ::3] = float("-inf")
    logits[2, 100:] = float("-inf")  # whole tiles of -inf
    ref = kernels.confidence_torch(logits)
    out = kernels.confidence_triton(logits, block_v=64, splits=2)
    assert torch.equal(out.token, ref.token)
    assert_confidence_close(out, ref, torch.float32)


@interp
def test_confidence_interp_single_token_vocabulary_and_empty():
    """V = 1 gives prob 1, margin 1, entropy 0; N = 0 gives empty outputs."""
    out = kernels.confidence_triton(torch.randn(3, 1))
    assert out.token.tolist() == [0, 0, 0]
    assert torch.allclose(out.prob, torch.ones(3)) and torch.allclose(out.margin, torch.ones(3))
    assert torch.allclose(out.entropy, torch.zeros(3))
    assert kernels.confidence_triton(torch.randn(0, 10)).token.shape == (0,)


# ------------------------------------------------------------ fused LM head

HEAD_CASES = [
    # (N, D, V, blocks, splits)
    (5, 64, 1000, dict(block_v=128), 1),
    (20, 576, 1000, dict(block_v=128), 3),
    (33, 96, 4099, dict(block_v=256, block_n=16, block_d=32), None),
]


def assert_head_close(out: Confidence, ref: Confidence, hidden: torch.Tensor, weight: torch.Tensor,
                      temperature: float, dtype: torch.dtype) -> None:
    assert_all_written(out)
    # The logits are summed in another order than the reference's matmul, so
    # a near-tie may resolve either way: the chosen token's logit must be the
    # row's maximum up to rounding.
    exact = hidden.double() @ weight.double().T  # (N, V)
    chosen = exact.gather(1, out.token[:, None])[:, 0]
    gap = (exact.max(1).values - chosen).abs()
    assert (gap <= 4 * tol(dtype) * exact.abs().max(1).values.clamp_min(1)).all(), gap.max()
    same = out.token == ref.token
    assert same.float().mean() > 0.9
    for name in ("prob", "margin", "entropy"):
        err = rel_err(getattr(out, name)[same], getattr(ref, name)[same])
        assert err < 4 * tol(dtype), f"{name}: relative error {err:.2e}"


@interp
@pytest.mark.parametrize("n,d,v,blocks,splits", HEAD_CASES)
@pytest.mark.parametrize("dtype", DTYPES_CPU)
def test_lm_head_confidence_interp_matches_reference(n, d, v, blocks, splits, dtype):
    """The LM head fused with the confidence matches matmul-then-confidence."""
    gen = torch.Generator().manual_seed(n + d + v)
    hidden = torch.randn(n, d, generator=gen).to(dtype)
    weight = (torch.randn(v, d, generator=gen) * 3.0 / d**0.5).to(dtype)
    temperature = 0.8
    # The reference in float32 on CPU: float16 matmuls there round differently again.
    ref = kernels.lm_head_confidence_torch(hidden.float(), weight.float(), temperature=temperature)
    out = kernels.lm_head_confidence_triton(hidden, weight, temperature=temperature, splits=splits,
                                            out=poisoned_confidence(n, "cpu"), **blocks)
    assert_head_close(out, ref, hidden, weight, temperature, dtype)


def test_lm_head_reference_is_matmul_then_confidence():
    """lm_head_confidence_torch is confidence_torch of hidden @ weight.T."""
    hidden, weight = torch.randn(4, 16), torch.randn(50, 16)
    a = kernels.lm_head_confidence_torch(hidden, weight, temperature=0.5)
    b = kernels.confidence_torch(hidden @ weight.T, temperature=0.5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------ RMSNorm

NORM_SHAPES = [(7, 576), (33, 100), (2, 3, 64)]


def check_rms_norm(shape, dtype, device):
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=gen) * 2).to(dtype).to(device)
    w = (torch.rand(shape[-1], generator=gen) + 0.5).to(dtype).to(device)
    ref = model_rms_norm(x, w, 1e-5)
    assert torch.equal(kernels.rms_norm_torch(x, w, 1e-5), ref)
    poison = torch.full_like(x, float("nan"))
    out = kernels.rms_norm_triton(x, w, 1e-5, out=poison)
    assert out.data_ptr() == poison.data_ptr() and out.shape == x.shape and out.dtype == dtype
    assert torch.isfinite(out).all(), "an element was not written"
    err = rel_err(out, ref)
    assert err < tol(dtype), f"relative error {err:.2e}"


@interp
@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES_CPU)
def test_rms_norm_interp_matches_reference(shape, dtype):
    """Fused RMSNorm matches dllm.model.rms_norm, output in x's dtype."""
    check_rms_norm(shape, dtype, "cpu")


# --------------------------------------------------------------------- RoPE

ROPE_CASES = [
    # (B, H, Hkv, T, D, cos batch): a broadcast table, a non-power-of-two head dim
    (2, 3, 1, 7, 64, 1),
    (1, 4, 2, 33, 96, 1),
    (2, 2, 2, 5, 16, 2),
]


def check_rope(b, h, hkv, t, d, cos_b, dtype, device):
    gen = torch.Generator().manual_seed(b * h * t * d)
    # q as the model makes it: a transposed view of (B, T, H, D).
    q = torch.randn(b, t, h, d, generator=gen).to(dtype).to(device).transpose(1, 2)  # (B, H, T, D)
    k = torch.randn(b, hkv, t, d, generator=gen).to(dtype).to(device)  # (B, Hkv, T, D)
    positions = (torch.arange(t) + 11).expand(cos_b, t).to(device)
    cos, sin = rope_tables(positions, d, 10000.0)  # (cos_b, 1, T, D)
    ref_q, ref_k = model_apply_rope(q, cos, sin), model_apply_rope(k, cos, sin)
    tq, tk = kernels.apply_rope_torch(q, k, cos, sin)
    assert torch.equal(tq, ref_q) and torch.equal(tk, ref_k)
    q_before, k_before = q.clone(), k.clone()
    out = (torch.full_like(q, float("nan")), torch.full_like(k, float("nan")))
    oq, ok = kernels.apply_rope_triton(q, k, cos, sin, out=out)
    assert oq is out[0] and ok is out[1]
    assert torch.equal(q, q_before) and torch.equal(k, k_before), "the inputs were changed"
    for o, r in ((oq, ref_q), (ok, ref_k)):
        assert o.dtype == dtype and o.shape == r.shape
        assert torch.isfinite(o).all(), "an element was not written"
        err = rel_err(o, r)
        assert err < tol(dtype), f"relative error {err:.2e}"


@interp
@pytest.mark.parametrize("b,h,hkv,t,d,cos_b", ROPE_CASES)
@pytest.mark.parametrize("dtype", DTYPES_CPU)
def test_rope_interp_matches_reference(b, h, hkv, t, d, cos_b, dtype):
    """One RoPE launch for q and k matches dllm.model.apply_rope on each."""
    check_rope(b, h, hkv, t, d, cos_b, dtype, "cpu")


# ----------------------------------------------------------------- dispatch

def test_dispatch_auto_uses_torch_on_cpu(monkeypatch):
    """backend='auto' runs the torch references on CPU tensors, with or without the interpreter flag."""
    def boom(*args, **kwargs):
        raise AssertionError("the Triton path ran on CPU tensors under backend='auto'")

    # import_module, since `kernels.confidence` the attribute is the function.
    for mod, name in (("confidence", "confidence_triton"), ("lm_head_confidence", "lm_head_confidence_triton"),
                      ("rmsnorm", "rms_norm_triton"), ("rope", "apply_rope_triton")):
        monkeypatch.setattr(importlib.import_module(f"kernels.{mod}"), name, boom)
    x = torch.randn(4, 32)
    for flag in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", flag)
        assert not use_triton(x)
        assert torch.equal(kernels.confidence(x).token, x.argmax(-1))
        kernels.lm_head_confidence(x, torch.randn(10, 32))
        kernels.rms_norm(x, torch.ones(32), 1e-5)
        cos, sin = rope_tables(torch.arange(3)[None], 32, 10000.0)
        kernels.apply_rope(torch.randn(1, 2, 3, 32), torch.randn(1, 1, 3, 32), cos, sin)


@interp
def test_dispatch_interp_triton_on_cpu_needs_the_flag(monkeypatch):
    """backend='triton' on CPU runs the interpreter only with TRITON_INTERPRET=1, else a clear error."""
    x = torch.randn(4, 32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not interpreter_enabled()
    with pytest.raises(KernelError, match="TRITON_INTERPRET=1"):
        kernels.confidence(x, backend="triton")
    assert not use_triton(x, backend="torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        use_triton(x, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(x, backend="triton")
    out = kernels.confidence(x, backend="triton")
    assert torch.equal(out.token, x.argmax(-1))


def test_bad_inputs_raise_value_errors():
    """Wrong shapes, dtypes and temperatures are refused with a ValueError saying what was expected."""
    with pytest.raises(ValueError, match=r"\(N, V\)"):
        kernels.confidence(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="temperature"):
        kernels.confidence(torch.randn(2, 3), temperature=0.0)
    with pytest.raises(ValueError, match="noise"):
        kernels.confidence(torch.randn(2, 3), noise=torch.randn(2, 4))
    with pytest.raises(ValueError, match="share a dtype"):
        kernels.lm_head_confidence(torch.randn(2, 8), torch.randn(5, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="weight"):
        kernels.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-5)
    with pytest.raises(ValueError, match="even"):
        kernels.apply_rope(torch.randn(1, 1, 2, 5), torch.randn(1, 1, 2, 5), torch.ones(1, 1, 2, 5),
                           torch.ones(1, 1, 2, 5))


def test_cpu_kernels_in_child_process():
    """Where this process compiles, the interpreter tests run in a fresh Python with TRITON_INTERPRET=1."""
    if INTERP:
        pytest.skip("the interpreter tests ran in this process")
    if not triton_available():
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-k", "interp", "-p", "no:cacheprovider"]
    done = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " skipped" not in done.stdout.splitlines()[-1], done.stdout[-2000:]


def _has_cuda_backend() -> bool:
    if not triton_available():
        return False
    from triton.backends import backends
    return "nvidia" in backends


@pytest.mark.slow
@pytest.mark.skipif(not _has_cuda_backend(), reason="needs triton with its NVIDIA backend (ptxas)")
def test_kernels_compile_for_sm90_without_a_gpu():
    """Every kernel config compiles to an sm_90 cubin (Triton's compiler and ptxas, no GPU), without spills."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "kernels.bench", "--compile-only", "--arch", "90", "--dtype", "bfloat16"]
    done = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "all kernels compiled" in done.stdout
    rows = [line for line in done.stdout.splitlines() if " ok " in line]
    assert rows and all(" 0 B stack" in line for line in rows), done.stdout


# ------------------------------------------------------------ on a real GPU

@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES_CUDA)
@pytest.mark.parametrize("n,v", [(5, 1000), (64, 4099), (64, 49152), (300, 126464), (7, 152064)])
def test_confidence_cuda_matches_reference(n, v, dtype):
    """Compiled confidence kernel on CUDA, realistic vocabularies, default tiling and splits."""
    gen = torch.Generator().manual_seed(v)
    logits = random_logits(n, v, dtype, "cuda", gen)
    noise = gumbel(n, v, "cuda", gen)
    for temperature, z in ((1.0, None), (0.7, noise)):
        ref = kernels.confidence_torch(logits, temperature=temperature, noise=z)
        out = kernels.confidence(logits, temperature=temperature, noise=z,
                                 backend="triton")  # "auto" would pick it too
        assert torch.equal(out.token, ref.token)
        assert_confidence_close(out, ref, dtype)
        poisoned = kernels.confidence_triton(logits, temperature=temperature, noise=z,
                                             out=poisoned_confidence(n, "cuda"))
        assert_all_written(poisoned)
    assert use_triton(logits)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES_CUDA)
@pytest.mark.parametrize("n,d,v", [(5, 64, 1000), (64, 576, 49152), (200, 96, 4099), (64, 4096, 8192)])
def test_lm_head_confidence_cuda_matches_reference(n, d, v, dtype):
    """Compiled fused LM head on CUDA against matmul-then-confidence."""
    gen = torch.Generator().manual_seed(n + d + v)
    hidden = torch.randn(n, d, generator=gen).to(dtype).cuda()
    weight = (torch.randn(v, d, generator=gen) * 3.0 / d**0.5).to(dtype).cuda()
    ref = kernels.lm_head_confidence_torch(hidden.float(), weight.float(), temperature=0.8)
    out = kernels.lm_head_confidence_triton(hidden, weight, temperature=0.8, out=poisoned_confidence(n, "cuda"))
    assert_head_close(out, ref, hidden, weight, 0.8, dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES_CUDA)
@pytest.mark.parametrize("shape", NORM_SHAPES + [(4096, 4096), (3, 257, 3584)])
def test_rms_norm_cuda_matches_reference(shape, dtype):
    """Compiled RMSNorm on CUDA."""
    check_rms_norm(shape, dtype, "cuda")


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES_CUDA)
@pytest.mark.parametrize("b,h,hkv,t,d,cos_b", ROPE_CASES + [(16, 9, 3, 256, 64, 16), (2, 32, 32, 300, 128, 1)])
def test_rope_cuda_matches_reference(b, h, hkv, t, d, cos_b, dtype):
    """Compiled RoPE on CUDA."""
    check_rope(b, h, hkv, t, d, cos_b, dtype, "cuda")
