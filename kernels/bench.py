"""Time each Triton kernel against its PyTorch reference.

    python -m kernels.bench                 # the table, on CUDA if present
    python -m kernels.bench --only rope     # one kernel family
    python -m kernels.bench --compile-only  # compile every kernel for sm_90, no GPU needed

On CUDA each row is the median of `triton.testing.do_bench` for the torch
reference and for the Triton kernel, at the sizes the dLLM runs (SmolLM2's
49k and LLaDA's 126k vocabularies, D 576 and 4096), with the bandwidth the
kernel reached against the bytes it must move. On a CPU the Triton column is
empty: the interpreter is for tests, not timing, so only the references are
timed (a median of wall-clock runs), and sizes too large for a small CPU box
are skipped and listed.

`--compile-only` builds the compiled (not interpreted) kernels for a CUDA
target with Triton's own compiler and ptxas, which needs no GPU, and prints
each kernel's registers and spills: a CI-side check that the kernels still
compile, and a first look at register pressure. Follows the benchmark habits
of the design brief: a table, the command that produced it, and the machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from kernels import (
    apply_rope_torch,
    apply_rope_triton,
    confidence_torch,
    confidence_triton,
    lm_head_confidence_torch,
    lm_head_confidence_triton,
    rms_norm_torch,
    rms_norm_triton,
)
from kernels.dispatch import library_interpreted, triton_available

__all__ = ["main"]

FAMILIES = ("confidence", "lm_head", "rmsnorm", "rope")
DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}  # torch name: Triton name
# On a CPU, skip cases whose tensors pass this many bytes: the reference
# materialises float32 copies several times over.
CPU_BYTES_LIMIT = 300 * 2**20
# And matmuls beyond this many FLOPs (a 2-core box does ~1e11 a second).
CPU_FLOP_LIMIT = 2e11


@dataclass
class Case:
    family: str
    shape: str
    torch_fn: Callable[[], object]
    triton_fn: Callable[[], object]
    bytes_moved: int  # the least the kernel must read and write
    input_bytes: int
    flops: float = 0.0


def _cases(device: torch.device, dtype: torch.dtype, only: set[str]) -> Iterator[Case | str]:
    """Cases, built lazily (so a skipped one allocates nothing); a str is a skip note."""
    gen = torch.Generator(device=device).manual_seed(0)
    esize = torch.empty((), dtype=dtype).element_size()
    on_cpu = device.type == "cpu"

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    def too_big(nbytes: int, flops: float = 0.0) -> bool:
        return on_cpu and (nbytes > CPU_BYTES_LIMIT or flops > CPU_FLOP_LIMIT)

    if "confidence" in only:
        for n, v, noisy in ((64, 49152, False), (64, 126464, False), (64, 126464, True),
                            (4096, 49152, False), (4096, 126464, False)):
            shape = f"N={n} V={v}" + (" +noise" if noisy else "")
            nbytes = n * v * (esize + (4 if noisy else 0))
            if too_big(nbytes):
                yield f"confidence {shape}: skipped on CPU ({nbytes / 2**20:.0f} MiB in)"
                continue
            logits = rand(n, v, scale=3.0)
            noise = torch.rand(n, v, generator=gen, device=device) if noisy else None
            yield Case("confidence", shape,
                       lambda x=logits, z=noise: confidence_torch(x, noise=z),
                       lambda x=logits, z=noise: confidence_triton(x, noise=z),
                       bytes_moved=nbytes + n * 20, input_bytes=nbytes)

    if "lm_head" in only:
        for n, d, v in ((64, 576, 49152), (4096, 576, 49152), (64, 4096, 126464), (4096, 4096, 126464)):
            shape = f"N={n} D={d} V={v}"
            nbytes = (n + v) * d * esize
            flops = 2.0 * n * d * v
            if too_big(nbytes + n * v * 4, flops):
                yield f"lm_head {shape}: skipped on CPU ({flops / 1e9:.0f} GFLOP)"
                continue
            hidden, weight = rand(n, d), rand(v, d, scale=d**-0.5)
            yield Case("lm_head", shape,
                       lambda h=hidden, w=weight: lm_head_confidence_torch(h, w),
                       lambda h=hidden, w=weight: lm_head_confidence_triton(h, w),
                       bytes_moved=nbytes + n * 20, input_bytes=nbytes, flops=flops)

    if "rmsnorm" in only:
        for m, d in ((4096, 576), (4096, 4096), (16384, 4096)):
            shape = f"M={m} D={d}"
            nbytes = 2 * m * d * esize
            if too_big(nbytes):
                yield f"rmsnorm {shape}: skipped on CPU"
                continue
            x, w = rand(m, d), rand(d)
            yield Case("rmsnorm", shape,
                       lambda x=x, w=w: rms_norm_torch(x, w, 1e-5),
                       lambda x=x, w=w: rms_norm_triton(x, w, 1e-5),
                       bytes_moved=nbytes, input_bytes=nbytes // 2)

    if "rope" in only:
        for b, h, hkv, t, d in ((16, 9, 3, 256, 64), (16, 32, 32, 256, 128), (16, 28, 4, 256, 128)):
            shape = f"B={b} H={h} Hkv={hkv} T={t} D={d}"
            qk = b * (h + hkv) * t * d
            nbytes = 2 * qk * esize + 2 * b * t * d * 4
            if too_big(nbytes):
                yield f"rope {shape}: skipped on CPU"
                continue
            q = rand(b, t, h, d).transpose(1, 2)  # (B, H, T, D) as the model makes it
            k = rand(b, hkv, t, d)
            pos = torch.arange(t, device=device).expand(b, t)
            inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=device).float() / d))
            ang = pos.float()[..., None] * inv
            ang = torch.cat([ang, ang], -1)[:, None]  # (B, 1, T, D)
            cos, sin = ang.cos(), ang.sin()
            yield Case("rope", shape,
                       lambda q=q, k=k, c=cos, s=sin: apply_rope_torch(q, k, c, s),
                       lambda q=q, k=k, c=cos, s=sin: apply_rope_triton(q, k, c, s),
                       bytes_moved=nbytes, input_bytes=nbytes // 2)


def _time_cpu(fn: Callable[[], object], budget_s: float = 1.0) -> float:
    """Median wall-clock milliseconds of `fn`, after one warm-up run."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def run_table(only: set[str], dtype: torch.dtype) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_gpu = device.type == "cuda" and triton_available() and not library_interpreted()
    print(f"command: python -m kernels.bench {' '.join(sys.argv[1:])}".rstrip())
    print(f"device:  {_device_name(device)}; torch {torch.__version__}; dtype {str(dtype).removeprefix('torch.')}")
    if not use_gpu:
        print("triton:  timings need a CUDA GPU (the interpreter is for tests); torch references only")
    else:
        from triton.testing import do_bench
    header = f"{'kernel':<11} {'shape':<30} {'torch ms':>10} {'triton ms':>10} {'speedup':>8} {'triton GB/s':>12}"
    print()
    print(header)
    print("-" * len(header))
    notes: list[str] = []
    for case in _cases(device, dtype, only):
        if isinstance(case, str):
            notes.append(case)
            continue
        if use_gpu:
            t_torch = do_bench(case.torch_fn, return_mode="median")
            t_triton = do_bench(case.triton_fn, return_mode="median")
            gbs = case.bytes_moved / (t_triton * 1e-3) / 1e9
            print(f"{case.family:<11} {case.shape:<30} {t_torch:>10.4f} {t_triton:>10.4f} "
                  f"{t_torch / t_triton:>7.2f}x {gbs:>12.0f}")
        else:
            t_torch = _time_cpu(case.torch_fn)
            print(f"{case.family:<11} {case.shape:<30} {t_torch:>10.3f} {'-':>10} {'-':>8} {'-':>12}")
        del case
    if notes:
        print()
        for note in notes:
            print(note)
    return 0


# ---------------------------------------------------------------- --compile-only

def _compile_specs(dtype: str) -> Iterator[tuple[str, Callable[[], object], dict[str, str], dict, dict]]:
    """(label, builder, pointer dtypes, constexprs, options) for each kernel config."""
    import importlib

    conf = importlib.import_module("kernels.confidence")
    head = importlib.import_module("kernels.lm_head_confidence")
    norm = importlib.import_module("kernels.rmsnorm")
    rope = importlib.import_module("kernels.rope")
    outs = {"token_ptr": "i64", "prob_ptr": "fp32", "margin_ptr": "fp32", "entropy_ptr": "fp32",
            "part_f_ptr": "fp32", "part_i_ptr": "i32"}
    for noise in (False, True):
        for final in (True, False):
            yield ("confidence", lambda: conf._build()._confidence_kernel,
                   {"logits_ptr": dtype, "noise_ptr": "fp32", **outs},
                   dict(HAS_NOISE=noise, FINAL=final, ROWS=1, BLOCK_V=2048), dict(num_warps=8))
    yield ("merge", lambda: conf._build()._merge_kernel, outs, dict(ROWS=128), dict(num_warps=4))
    precision = "ieee" if dtype == "fp32" else "tf32"
    for bn, warps in ((64, 8), (16, 4)):
        for final in (True, False):
            yield ("lm_head", lambda: head._build()._lm_head_kernel, {"h_ptr": dtype, "w_ptr": dtype, **outs},
                   dict(FINAL=final, BLOCK_N=bn, BLOCK_V=128, BLOCK_D=64, PRECISION=precision),
                   dict(num_warps=warps, num_stages=3))
    for rows, bd, warps in ((4, 1024, 4), (1, 4096, 4)):
        yield ("rmsnorm", lambda: norm._build()._rms_norm_kernel, {"x_ptr": dtype, "w_ptr": dtype, "out_ptr": dtype},
               dict(ROWS=rows, BLOCK_D=bd), dict(num_warps=warps))
    for bt, bd in ((32, 64), (16, 128)):
        yield ("rope", lambda: rope._build()._rope_kernel,
               {"q_ptr": dtype, "k_ptr": dtype, "qo_ptr": dtype, "ko_ptr": dtype, "cos_ptr": "fp32", "sin_ptr": "fp32"},
               dict(BLOCK_T=bt, BLOCK_D=bd), dict(num_warps=4))


def _resource_usage(kernel: object) -> str:
    """Registers and spills of a compiled cubin, read with Triton's cuobjdump."""
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    cubin = kernel.asm.get("cubin") if hasattr(kernel, "asm") else None
    if cubin is None or not os.path.exists(tool):
        return "?"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        if "REG:" in line:
            fields = dict(p.split(":", 1) for p in line.split() if ":" in p)
            return f"{fields.get('REG', '?'):>4} regs, {fields.get('STACK', '?'):>4} B stack"
    return "?"


# Rope's strides and half head size, and the hidden size D.
_DIVISIBLE_INTS = frozenset("D HALF sqb sqh sqt skb skh skt sqob sqoh sqot skob skoh skot scb sct ssb sst".split())


def compile_only(arch: int, dtypes: list[str]) -> int:
    """Compile every kernel config for sm_`arch` and each Triton dtype name
    in `dtypes` ("bf16", "fp16", "fp32"); 0 if all compiled."""
    if not triton_available():
        print("triton is not installed")
        return 1
    if library_interpreted():
        print("triton was imported with TRITON_INTERPRET=1; unset it to compile")
        return 1
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    print(f"command: python -m kernels.bench {' '.join(sys.argv[1:])}".rstrip())
    print(f"target:  sm_{arch}; triton {triton.__version__}; no GPU used")
    print()
    failed = 0
    for dtype in dtypes:
        for label, get, ptrs, consts, opts in _compile_specs(dtype):
            fn = get()
            sig: dict[str, str] = {}
            attrs = {}
            for i, p in enumerate(fn.params):
                if p.is_constexpr:
                    sig[p.name] = "constexpr"
                elif p.name.endswith("_ptr"):
                    sig[p.name] = "*" + ptrs[p.name]
                    attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 256-byte aligned
                elif p.name in ("temperature", "eps"):
                    sig[p.name] = "fp32"
                else:
                    sig[p.name] = "i32"
                    # Triton specialises ints divisible by 16 when launched;
                    # strides and head sizes are, at every real shape.
                    if p.name in _DIVISIBLE_INTS or p.name.startswith("stride"):
                        attrs[(i,)] = [["tt.divisibility", 16]]
            t0 = time.perf_counter()
            try:
                k = triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=opts)
                usage = _resource_usage(k)
                status = f"ok  {usage}"
            except Exception as e:  # noqa: BLE001  report every failure, not just the first
                failed += 1
                status = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            cfg = " ".join(f"{k}={v}" for k, v in consts.items())
            print(f"{label:<11} {dtype:<5} {cfg:<62} {time.perf_counter() - t0:5.1f}s  {status}")
    print()
    print("all kernels compiled" if not failed else f"{failed} kernel configs failed to compile")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=FAMILIES, action="append",
                        help="time only this kernel family (repeatable)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="input dtype (default bfloat16; --compile-only: all three)")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile every kernel for a CUDA target without a GPU, then exit")
    parser.add_argument("--arch", type=int, default=90, help="compute capability for --compile-only (90: H100)")
    args = parser.parse_args(argv)
    if args.compile_only:
        return compile_only(args.arch, [DTYPES[args.dtype]] if args.dtype else list(DTYPES.values()))
    return run_table(set(args.only or FAMILIES), getattr(torch, args.dtype or "bfloat16"))


if __name__ == "__main__":
    sys.exit(main())
