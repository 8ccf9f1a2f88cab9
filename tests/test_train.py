"""Training: data generation, the diffusion loss, LoRA, and the saved adapter on a tiny model."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
from conftest import byte_tokenizer

from dllm.chat import CHATML
from dllm.training.cards import card_turn
from dllm.training.data import TEMPLATES, Slots, cleanup_row, generate, is_heldout_template, number_words
from dllm.training.talk import talk_turn
from dllm.loaders import merge_adapter, read_adapter
from dllm.lora import RowEmbedding, add_lora, save_adapter, shrink_adapter
from dllm.model import PRESETS, Transformer
from dllm.training.train import TrainConfig, build_examples, collate, diffusion_loss, make_examples, train
from dllm.turn import TurnLayout

WORDS = ["lantern", "marble", "quiver", "saddle", "thimble", "walrus", "zephyr", "bramble"]
ROWS = [
    {"raw": "um where is the the library", "cleaned": "Where is the library?", "reply": "It is on Main Street.",
     "knowledge": None, "history": []},
    {"raw": "call anna at three no sorry four", "cleaned": "Call Anna at four.", "reply": None,
     "knowledge": None, "history": []},
    {"raw": "uh how much is a day pass", "cleaned": "How much is a day pass?", "reply": "A day pass is 9 dollars.",
     "knowledge": "Gym. Day pass 9 dollars.", "history": []},
]


def tiny_model(tok, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(PRESETS["tiny"].with_(mask_id=tok.mask_id))


def test_number_words():
    """Numbers are spelled as a recogniser writes them."""
    assert number_words(7) == "seven"
    assert number_words(42) == "forty two"
    assert number_words(305) == "three hundred five"


def test_data_is_reproducible_and_heldout_is_disjoint():
    """The same seed gives the same rows; held-out rows use held-out templates and values only."""
    a = generate(3, n_cleanup=30, n_grounded=10, n_talk=10, heldout=False, words=WORDS)
    b = generate(3, n_cleanup=30, n_grounded=10, n_talk=10, heldout=False, words=WORDS)
    assert a == b
    train_names = set(Slots(WORDS, heldout=False).lists["name"])
    held_names = set(Slots(WORDS, heldout=True).lists["name"])
    assert train_names and held_names and not train_names & held_names
    assert any(is_heldout_template(i) for i in range(len(TEMPLATES)))
    for row in a:
        assert set(row) >= {"raw", "cleaned", "reply", "knowledge", "history"}
        assert row["raw"] == row["raw"].lower() and "?" not in row["raw"]


def test_speech_round_trip_rows_join_the_training_rows_or_the_spoken_set(tmp_path):
    """--asr-roundtrip splits its rows (empty transcripts dropped) by sentence: the held-out fifth, every voice of
    it, goes to heldout_spoken.jsonl, the rest to train.jsonl (--asr-repeat times), none to heldout.jsonl; a
    missing file is an error."""
    from dllm.training.data import is_heldout_spoken
    from dllm.training.data import main as make_data
    sentences = [f"Where is room {n}?" for n in range(40)]
    rows = [{"raw": s.lower().rstrip("?"), "cleaned": s, "reply": None, "knowledge": None, "history": [],
             "spoken": s, "voice": v} for s in sentences for v in ("piper-1.0", "espeak-en")]
    rows.append({"raw": " ", "cleaned": "Hi.", "reply": None, "knowledge": None, "history": [], "spoken": "y",
                 "voice": "piper-1.0"})
    rt = tmp_path / "rt.jsonl"
    rt.write_text("".join(json.dumps(r) + "\n" for r in rows))
    small = ["--cleanup", "20", "--grounded", "5", "--talk", "5", "--heldout-cleanup", "5", "--heldout-grounded", "2",
             "--heldout-talk", "2"]
    make_data(["--out", str(tmp_path / "d"), *small, "--asr-roundtrip", str(rt), "--asr-repeat", "3"])
    read = lambda name: [json.loads(x) for x in (tmp_path / "d" / name).open()]  # noqa: E731
    trained = [r["cleaned"] for r in read("train.jsonl") if r.get("voice")]
    spoken = [r["cleaned"] for r in read("heldout_spoken.jsonl")]
    assert 0 < len(set(spoken)) < len(sentences)  # a fifth, give or take, of 40 sentences
    assert sorted(spoken) == sorted(2 * [s for s in sentences if is_heldout_spoken({"cleaned": s})])
    assert sorted(trained) == sorted(6 * [s for s in sentences if not is_heldout_spoken({"cleaned": s})])
    assert not any(r.get("voice") for r in read("heldout.jsonl"))
    with pytest.raises(SystemExit, match="no such file"):
        make_data(["--out", str(tmp_path / "e"), *small, "--asr-roundtrip", str(tmp_path / "absent.jsonl")])


def test_self_correction_keeps_only_the_corrected_slot():
    """A corrected slot appears in the raw text twice (wrong, right) but once, right, in the clean text."""
    rng = random.Random(0)
    slots = Slots(WORDS, heldout=False)
    seen = 0
    for _ in range(300):
        row = cleanup_row("I need a ticket to {city} on {day}.", slots, rng, "")
        city = row["cleaned"].split(" to ")[1].split(" on ")[0].lower()
        words = iter(row["raw"].split())
        assert all(w in words for w in city.split()), "the right city is said (a filler may split it)"
        seen += any(c in row["raw"] for c in ("no sorry", "i mean", "actually", "wait no"))
    assert seen > 20


def test_card_replies_state_the_fact_in_words_or_decline():
    """A card reply holds an accepted string, says numbers as words (never digits), or says it does not know."""
    rng = random.Random(1)
    for _ in range(200):
        card, question, reply, accept = card_turn(rng, heldout=False)
        assert card and question.endswith("?") and reply
        assert any(a.lower() in reply.lower() for a in accept), (card, question, reply, accept)
        assert "wifi password" in reply or not any(c.isdigit() for c in reply), reply


def test_talk_turns_fit_their_intent_and_repeat_from_history():
    """Conversational replies carry their accepted words; "say that again" repeats the last reply."""
    rng = random.Random(2)
    slots = Slots(WORDS, heldout=False)
    history = (("Where is the exit?", "The exit is at the back."),)
    repeats = 0
    for _ in range(300):
        user, reply, accept = talk_turn(rng, slots, False, history)
        assert user and reply and any(a.lower() in reply.lower() for a in accept), (user, reply, accept)
        repeats += reply == history[-1][1]
    assert repeats > 5
    held = {talk_turn(random.Random(i), slots, True)[0] for i in range(200)}
    train = {talk_turn(random.Random(i), slots, False)[0] for i in range(200)}
    assert held and not (held & train) - {"Hi."}, "held-out phrasings are kept apart"


def test_loss_decreases_on_a_tiny_model(tmp_path):
    """Twenty steps of LoRA training lower the masked-diffusion loss, and checkpoints are written."""
    tok = byte_tokenizer()
    model = tiny_model(tok)
    full, clean = make_examples(ROWS, tok, CHATML, tok.mask_id)
    assert len(full) == 2 and len(clean) == 3
    probe = collate(full + clean[:1], tok.end_id)
    t = torch.full((3,), 0.5)
    before = diffusion_loss(model, probe, tok.mask_id, generator=torch.Generator().manual_seed(0), t=t).item()
    cfg = TrainConfig(steps=20, batch=3, lr=1e-2, warmup=2, rank=4, alpha=8, save_every=10, bf16=False)
    losses = train(model, tok, ROWS, cfg, run=tmp_path / "run", base="tiny", log=lambda m: None)
    after = diffusion_loss(model, probe, tok.mask_id, generator=torch.Generator().manual_seed(0), t=t).item()
    assert len(losses) == 20
    assert after < before * 0.8
    meta = json.loads((tmp_path / "run" / "adapter" / "adapter.json").read_text())
    assert meta["steps"] == 20 and meta["rank"] == 4 and meta["attention"] == "prefix"
    assert (tmp_path / "run" / "state.pt").is_file()


def test_resume_continues_from_the_saved_step(tmp_path):
    """--resume picks up the step count and adapter from the run directory."""
    tok = byte_tokenizer()
    cfg = TrainConfig(steps=4, batch=2, lr=1e-3, warmup=1, rank=2, alpha=4, save_every=2, bf16=False)
    train(tiny_model(tok), tok, ROWS, cfg, run=tmp_path, base="tiny", log=lambda m: None)
    lines = []
    cfg.steps = 6
    losses = train(tiny_model(tok), tok, ROWS, cfg, run=tmp_path, resume=True, base="tiny", log=lines.append)
    assert any("resumed at step 4" in line for line in lines)
    assert len(losses) == 6
    assert json.loads((tmp_path / "adapter" / "adapter.json").read_text())["steps"] == 6


def test_saved_adapter_merges_to_the_same_forward(tmp_path):
    """save -> dllm.loaders.merge_adapter -> forward equals the LoRA-wrapped forward, mask row included."""
    tok = byte_tokenizer()
    wrapped = tiny_model(tok, seed=1)
    base_state = {k: v.clone() for k, v in wrapped.state_dict().items()}
    add_lora(wrapped, rank=4, alpha=8, train_rows=[tok.mask_id])
    assert isinstance(wrapped.embed, RowEmbedding)
    with torch.no_grad():  # a non-trivial adapter: random B and a new mask row
        for p in wrapped.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    save_adapter(tmp_path, wrapped, meta={"base": "tiny", "steps": 0})
    adapter = read_adapter(tmp_path)
    assert adapter.rank == 4 and len(adapter.lora) == 2 * 7
    assert adapter.rows["embed"][0].tolist() == [tok.mask_id]

    merged = Transformer(PRESETS["tiny"].with_(mask_id=tok.mask_id))
    merged.load_state_dict(base_state)
    merge_adapter(merged, tmp_path)
    tokens = torch.tensor([[5, 9, 13, tok.mask_id, tok.mask_id, 40, 41]])
    with torch.no_grad():
        a = wrapped(tokens, prefix_len=3)
        b = merged(tokens, prefix_len=3)
    assert torch.allclose(a, b, atol=1e-4)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_full_finetune_ships_an_svd_adapter_that_merges_to_its_forward(tmp_path, device):
    """--full trains the target weights; at full rank the saved adapter merges back to the same forward."""
    tok = byte_tokenizer()
    model = tiny_model(tok, seed=2).to(device)
    base_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    rank = 64  # the tiny model's widest target is 64 wide: the SVD keeps everything
    cfg = TrainConfig(steps=6, batch=3, lr=1e-2, warmup=1, rank=rank, alpha=2 * rank, save_every=6,
                      bf16=device == "cuda", full=True)
    lines = []
    losses = train(model, tok, ROWS, cfg, run=tmp_path, base="tiny", log=lines.append)
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert any("keeps 100.0%" in line for line in lines), lines
    assert json.loads((tmp_path / "adapter" / "adapter.json").read_text())["svd_energy_kept"] == 1.0

    merged = Transformer(PRESETS["tiny"].with_(mask_id=tok.mask_id))
    merged.load_state_dict(base_state)
    merge_adapter(merged, tmp_path / "adapter")
    assert not torch.equal(merged.layers[0].attn.q_proj.weight, base_state["layers.0.attn.q_proj.weight"])
    tokens = torch.tensor([[5, 9, 13, tok.mask_id, tok.mask_id, 40, 41]])
    with torch.no_grad():
        a = model.float()(tokens.to(device), prefix_len=3).cpu()
        b = merged(tokens, prefix_len=3)
    assert torch.allclose(a, b, atol=1e-3)


def test_shrink_adapter_keeps_the_largest_directions(tmp_path):
    """A rank-2 shrink of a rank-4 adapter is the best rank-2 approximation of each delta."""
    tok = byte_tokenizer()
    wrapped = tiny_model(tok)
    add_lora(wrapped, rank=4, alpha=8, train_rows=[tok.mask_id])
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    save_adapter(tmp_path / "r4", wrapped, meta={"base": "tiny"})
    kept = shrink_adapter(tmp_path / "r4", tmp_path / "r2", 2, dtype=torch.float32)
    big, small = read_adapter(tmp_path / "r4"), read_adapter(tmp_path / "r2")
    assert 0.0 < kept < 1.0 and small.rank == 2 and small.meta["shrunk_from_rank"] == 4
    name = "layers.1.mlp.down_proj"
    (a4, b4), (a2, b2) = big.lora[name], small.lora[name]
    want = torch.linalg.svd(big.scale * b4 @ a4)
    best = want.U[:, :2] @ torch.diag(want.S[:2]) @ want.Vh[:2]
    assert torch.allclose(small.scale * b2 @ a2, best, atol=1e-5)
    assert torch.equal(small.rows["embed"][1], big.rows["embed"][1])
    with pytest.raises(ValueError, match="above the adapter's own rank"):
        shrink_adapter(tmp_path / "r2", tmp_path / "r3", 3)


def test_time_budget_sets_the_step_count(tmp_path):
    """With a time budget the run measures its step rate and stops on its own, its schedule ended."""
    tok = byte_tokenizer()
    cfg = TrainConfig(steps=10**9, batch=2, lr=1e-3, warmup=30, rank=2, alpha=4, save_every=10**9, bf16=False,
                      time_budget=1.5)
    lines = []
    losses = train(tiny_model(tok), tok, ROWS, cfg, run=tmp_path, base="tiny", log=lines.append)
    assert any(line.startswith("time budget") for line in lines)
    assert 25 < len(losses) == cfg.steps < 10**6
    assert json.loads((tmp_path / "adapter" / "adapter.json").read_text())["steps"] == cfg.steps


def test_examples_are_built_by_workers_and_cached(tmp_path):
    """Forked tokenising workers give the same examples as one process; the cache returns them again."""
    tok = byte_tokenizer()
    rows = ROWS * 800  # above one worker's chunk, so both workers get some
    one = make_examples(rows, tok, CHATML, tok.mask_id)
    cache = tmp_path / "examples.pkl"
    two = build_examples(rows, tok, CHATML, tok.mask_id, layout=TurnLayout(), workers=2, cache=cache, log=lambda m: None)
    assert two == one and cache.is_file()
    assert build_examples([], tok, CHATML, tok.mask_id, layout=TurnLayout(), cache=cache, log=lambda m: None) == one
