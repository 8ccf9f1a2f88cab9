"""The Pipecat + llama.cpp peer benchmarks say what to install when their extra is missing.

The peer itself (pipecat-ai, llama-cpp-python) is never needed here: the
modules are hidden from the import system, whether installed or not.
"""
from __future__ import annotations

import os
import sys

import pytest

from voice import peer_bench


@pytest.fixture(autouse=True)
def own_environ(monkeypatch):
    """The benches set OpenMP defaults in os.environ: keep them out of the other tests."""
    monkeypatch.setattr(os, "environ", os.environ.copy())


@pytest.fixture
def no_peer(monkeypatch):
    for name in ("pipecat", "llama_cpp"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes `import name` fail


def test_require_peer_names_what_is_missing(no_peer):
    """require_peer raises PeerUnavailable naming both packages and the extra."""
    with pytest.raises(peer_bench.PeerUnavailable, match=r"pipecat.*llama_cpp.*\[peer\]"):
        peer_bench.require_peer()


def test_peer_bench_exits_with_a_clear_message(no_peer, capsys):
    """python -m voice.peer_bench exits 2 with the install hint, before loading any model."""
    assert peer_bench.main(["--n", "1"]) == 2
    err = capsys.readouterr().err
    assert "peer bench unavailable" in err and "pip install" in err


def test_voice_bench_peer_checks_the_interpreter_first(tmp_path, capsys):
    """voice.bench --peer with an interpreter that cannot run the peer stops before its own run."""
    from voice import bench

    assert bench.main(["--n", "1", "--peer", "--peer-python", str(tmp_path / "no-python")]) == 2
    assert "--peer: cannot run" in capsys.readouterr().err


def test_dllm_bench_llama_needs_the_default_model():
    """dllm.bench --llama refuses a random-weights preset: llama.cpp needs the packaged GGUF."""
    from dllm import bench

    with pytest.raises(SystemExit):
        bench.main(["--model", "tiny", "--llama"])


def test_dllm_bench_runs_a_random_weights_preset(capsys):
    """dllm.bench on a random-weights preset prints its grid row (its engine writes no words, so the word guard
    is off)."""
    from dllm import bench

    bench.main(["--model", "tiny", "--canvas", "32", "--batch", "1", "--repeats", "1", "--prompt", "16"])
    out = capsys.readouterr().out
    assert "tiny (random weights)" in out and "    32     1 |" in out, out


def test_llama_timing_without_llama_cpp_says_what_to_install(no_peer):
    """time_llama raises ImportError naming the peer extra when llama_cpp is missing."""
    from dllm.bench import time_llama

    with pytest.raises(ImportError, match=r"\[peer\]"):
        time_llama("model.gguf", [1, 2, 3], 4, 1, [0], 1)
