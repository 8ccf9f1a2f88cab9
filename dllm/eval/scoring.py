"""Scoring for the voice turn model, as ../shared/eval/README.md describes.

Word error rate after lower-casing, dropping punctuation, writing numbers as
digits ("fifteen" == "15") and splitting digit runs into single digits; the
baselines are the raw text and a regular-expression filler stripper. A
knowledge-card reply counts when it contains one of the accepted strings
(case-insensitive, on word boundaries). `reply_problem` names what makes a
reply degenerate (empty, repetitive, cut off).
"""
from __future__ import annotations

import re

# ----------------------------------------------------------------- normalisation

_UNITS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()) if i >= 2}


def _numbers_to_digits(words: list[str]) -> list[str]:
    """Replace runs of number words by their value: "twenty one" -> "21", "one five" -> "1", "5"."""
    out: list[str] = []
    cur, last = None, ""

    def flush() -> None:
        nonlocal cur, last
        if cur is not None:
            out.append(str(cur))
        cur, last = None, ""

    for w in words:
        if w in _UNITS:
            v = _UNITS[w]
            if cur is not None and (last == "tens" and v < 10 or last in ("hundred", "thousand")):
                cur, last = cur + v, "units"
            else:
                flush()
                cur, last = v, "units"
        elif w in _TENS:
            if cur is not None and last in ("hundred", "thousand"):
                cur, last = cur + _TENS[w], "tens"
            else:
                flush()
                cur, last = _TENS[w], "tens"
        elif w == "hundred" and cur is not None and last in ("units", "tens") and cur % 1000 < 100:
            low = cur % 1000
            cur, last = cur - low + low * 100, "hundred"
        elif w == "thousand" and cur is not None and cur < 1000 and last != "thousand":
            cur, last = cur * 1000, "thousand"
        else:
            flush()
            out.append(w)
    flush()
    return out


def normalise(text: str) -> list[str]:
    """Words for scoring: lower case, no punctuation, numbers as single digits.

    >>> normalise("Call me at 4562, fifteen times!")
    ['call', 'me', 'at', '4', '5', '6', '2', '1', '5', 'times']
    """
    text = text.lower().replace("-", " ")
    text = re.sub(r"[^a-z0-9' ]+", " ", text).replace("'", "")
    text = re.sub(r"(?<=\d)(?=[a-z])|(?<=[a-z])(?=\d)", " ", text)
    words = _numbers_to_digits(text.split())
    out = []
    for w in words:
        out += list(w) if w.isdigit() else [w]
    return out


def edit_distance(a: list[str], b: list[str]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def wer(hypotheses: list[str], references: list[str]) -> float:
    """Corpus word error rate: total edits over total reference words."""
    edits = words = 0
    for h, r in zip(hypotheses, references, strict=True):
        ref = normalise(r)
        edits += edit_distance(normalise(h), ref)
        words += len(ref)
    return edits / max(1, words)


_FILLER_RE = re.compile(r"\b(?:u+m+|u+h+|e+r+m*|h+m+|a+h+|you know|i mean|like|so|well|okay so)\b[,]?\s*", re.I)
_REPEAT_RE = re.compile(r"\b(\w+(?:\s+\w+)?)(?:\s+\1\b)+", re.I)


def strip_fillers(text: str) -> str:
    """The regular-expression baseline: drop filler words and immediate repeats."""
    text = _FILLER_RE.sub("", text)
    text = _REPEAT_RE.sub(r"\1", text)
    return " ".join(text.split())


def accepted(reply: str, accept: list[str]) -> bool:
    """Whether `reply` contains one of `accept`, case-insensitive, on word boundaries."""
    low = reply.lower().replace("\u2019", "'")
    return any(re.search(r"(?<!\w)" + re.escape(a.lower()) + r"(?!\w)", low) for a in accept)


def reply_problem(reply: str) -> str | None:
    """"empty", "repetitive", "cut off" or None for a healthy reply."""
    words = re.findall(r"[a-z0-9']+", reply.lower())
    if not words:
        return "empty"
    trigrams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    if len(set(trigrams)) < len(trigrams) or any(words[i] == words[i + 1] == words[i + 2] for i in range(len(words) - 2)):
        return "repetitive"
    if not reply.rstrip().endswith((".", "!", "?", '"', "'")):
        return "cut off"
    return None
