"""Evaluation scoring: WER normalisation, the filler-stripper baseline, the accept matcher."""
from __future__ import annotations

import json

import pytest

from dllm.eval.scoring import accepted, normalise, reply_problem, strip_fillers, wer


@pytest.mark.parametrize("a, b", [
    ("fifteen", "15"),
    ("4562", "four five six two"),
    ("twenty one", "21"),
    ("Call David at three o'clock.", "call david at 3 o'clock"),
    ("It's 3:30!", "its three thirty"),
    ("three hundred five", "305"),
    ("room two oh four", "room 2 oh 4"),
])
def test_normalise_equates_spellings(a, b):
    """Case, punctuation and number spellings do not count as errors."""
    assert normalise(a) == normalise(b)


def test_normalise_keeps_separate_numbers_apart():
    """Two numbers said in a row stay two numbers."""
    assert normalise("one five") == ["1", "5"]
    assert normalise("twenty twenty") == ["2", "0", "2", "0"]


def test_wer_counts_edits_over_reference_words():
    """WER is edits over reference words, after normalisation."""
    assert wer(["Hello there."], ["hello there"]) == 0.0
    assert wer(["hello"], ["hello there"]) == 0.5
    assert wer(["um hello the the there"], ["Hello there."]) == 1.5


def test_filler_stripper():
    """The regex baseline drops fillers and immediate repeats, and nothing else."""
    assert strip_fillers("um so where is the the library") == "where is the library"
    assert strip_fillers("uh you know i need a ticket") == "i need a ticket"
    assert strip_fillers("what time what time does it open") == "what time does it open"
    assert strip_fillers("please call anna") == "please call anna"


def test_accept_matches_on_word_boundaries():
    """Accepted strings match case-insensitively, never inside another word or number."""
    assert accepted("We open at 10 am.", ["10", "ten"])
    assert accepted("It's TEN dollars.", ["ten"])
    assert not accepted("It's 100 dollars.", ["10"])
    assert not accepted("It's often busy.", ["ten"])
    assert accepted("Sorry, I don\u2019t know that.", ["don't know"])
    assert accepted("Pick it up at counter 2.", ["counter 2", "counter two"])


def test_reply_problems():
    """Empty, repetitive and cut-off replies are told apart from healthy ones."""
    assert reply_problem("") == "empty"
    assert reply_problem("  ") == "empty"
    assert reply_problem("the the the zoo.") == "repetitive"
    assert reply_problem("We open at nine and we open at nine.") == "repetitive"
    assert reply_problem("We open at nine and") == "cut off"
    assert reply_problem("We open at nine.") is None


def test_evaluate_scores_every_part_and_when_the_first_sentence_settled():
    """`evaluate` on a tiny set: every part scored, and the first-sentence step lies within the pass."""
    from conftest import make_tiny_engine

    from dllm import SamplerOptions
    from dllm.eval.__main__ import evaluate
    engine = make_tiny_engine()
    sets = {"tiny": {"cleanup": [{"text": "um hi there", "reference": "Hi there."}],
                     "kiosk": [{"knowledge": "Open 9 to 5.", "question": "when do you open", "accept": ["9", "nine"]}],
                     "talk": [{"question": "hello", "accept": ["hello", "hi"], "reference": "Hello."}]}}
    r = evaluate(engine, sets, SamplerOptions(steps=4))["tiny"]
    assert r["cleanup"]["n"] == 1 and 0 <= r["cleanup"]["wer_model"]
    assert r["kiosk"]["n"] == 1 and r["talk"]["n"] == 1
    assert r["replies"]["n"] == 2 and 1 <= r["replies"]["first_sentence_step"] <= 4
    assert r["turn_cleaned"]["n"] == 1 and 0 <= r["turn_cleaned"]["wer_model"]  # only the row with a reference


def test_the_spoken_set_scores_cleanup_and_the_voice_turns_cleaned_field(tmp_path):
    """The spoken set (the held-out speech round trip) is cleaned alone and as voice turns; only the cleaned
    field of those turns is scored, so they add no replies."""
    from conftest import make_tiny_engine

    from dllm import SamplerOptions
    from dllm.eval.__main__ import evaluate, load_sets
    path = tmp_path / "spoken.jsonl"
    path.write_text(json.dumps({"raw": "um where is the the library", "cleaned": "Where is the library?",
                                "voice": "piper-1.0"}) + "\n")
    sets = load_sets(["spoken"], tmp_path / "absent.jsonl", path)
    assert sets["spoken"]["cleanup"] == [{"text": "um where is the the library", "reference": "Where is the library?"}]
    r = evaluate(make_tiny_engine(), sets, SamplerOptions(steps=4))["spoken"]
    assert r["cleanup"]["n"] == 1 and r["turn_cleaned"]["n"] == 1 and "replies" not in r
