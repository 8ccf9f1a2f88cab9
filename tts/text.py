"""Sentence chunking for streaming speech synthesis.

The reply is spoken sentence by sentence so the first one plays while the rest
are still being synthesised (or written). A sentence ends at `.`, `!`, `?` or
an ellipsis (with any closing quotes or brackets), followed by whitespace, or
at a line break. A full stop does not end a sentence when the next word starts
in lower case ("wait... what"), or when the word it closes is a common
abbreviation ("Dr.", "e.g."), an initial ("J.") or a dotted acronym ("U.S.").
Decimals ("3.5") never split because no space follows the point. Merging two
sentences by mistake costs a little latency; splitting one mid-phrase costs
prosody, so the rules err towards merging.
"""
from __future__ import annotations

import re

__all__ = ["split_sentences", "lead_clause", "SentenceBuffer"]

# Lower-cased, without the final dot. "etc." and "no." are left out on
# purpose: they end sentences more often than they sit inside one.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs approx dept est fig inc ltd co mt ave rd e.g i.e cf a.m p.m".split()
)
# Sentence punctuation, then closing quotes or brackets, then whitespace.
_END = re.compile(r"""([.!?\u2026]+["'\u201d\u2019)\]]*)\s+""")
_DOTTED = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]?")  # U.S, e.g, a.m


def _boundaries(text: str) -> list[int]:
    """Offsets where a new sentence starts. A boundary needs a visible
    character after it, so text ending in "Hello." has none at the end."""
    cuts: list[int] = []
    for m in _END.finditer(text):
        nxt = m.end()
        if nxt >= len(text):
            break  # nothing after yet: the caller decides (flush or wait)
        if text[nxt].islower():
            continue
        punct = m.group(1)
        if punct.rstrip("\"'\u201d\u2019)]") == ".":
            word = text[: m.start()].rsplit(None, 1)[-1] if text[: m.start()].strip() else ""
            word = word.lstrip("\"'(\u201c\u2018[")
            if word.lower() in _ABBREVIATIONS or _DOTTED.fullmatch(word) or (len(word) == 1 and word.isupper()):
                continue
        cuts.append(nxt)
    # Line breaks end a sentence (list items, paragraphs) whatever precedes or follows them.
    for m in re.finditer(r"\n\s*", text):
        if m.end() < len(text):
            cuts.append(m.end())
    return sorted(set(cuts))


def _pieces(text: str, cuts: list[int]) -> list[str]:
    out = []
    for a, b in zip([0, *cuts], [*cuts, len(text)]):
        piece = " ".join(text[a:b].split())
        # A piece with nothing to say ("...", "-") is dropped rather than voiced.
        if any(ch.isalnum() for ch in piece):
            out.append(piece)
    return out


def split_sentences(text: str) -> list[str]:
    """Split `text` into sentences, each stripped, with inner whitespace collapsed.

    Example:
        >>> split_sentences("Dr. Smith paid 3.5 dollars. Wait... what? Yes!")
        ['Dr. Smith paid 3.5 dollars.', 'Wait... what?', 'Yes!']

    Empty or whitespace-only text gives an empty list.
    """
    return _pieces(text, _boundaries(text))


def lead_clause(sentence: str, max_words: int = 4) -> list[str]:
    """The sentence as [its short opening clause, the rest], or [sentence] when it has none.

    A reply's first audio waits for piper to speak its first piece, and piper's
    time grows with the text: "I'm sorry," takes 52 ms where "I'm sorry, I
    don't know that." takes 118 (docs/BENCHMARKS.md). So the first sentence of
    a reply may go out in two pieces, cut at its first comma when at most
    `max_words` words come before it and at least two after; the rest is made
    while the opening plays.

    Example:
        >>> lead_clause("I'm sorry, I don't know that.")
        ["I'm sorry,", "I don't know that."]
        >>> lead_clause("The library opens at nine, and closes at six.")
        ['The library opens at nine, and closes at six.']
    """
    head, sep, tail = sentence.partition(", ")
    if not sep or len(head.split()) > max_words or len(tail.split()) < 2:
        return [sentence]
    return [head + ",", tail]


class SentenceBuffer:
    """Collects streamed text and hands out whole sentences.

    `push()` returns the sentences that are certainly complete: a sentence is
    only complete once the first character of the next one has arrived,
    because "Dr." followed by " Smith" must not be cut. `flush()` returns
    whatever is left (call it when the text ends). Text that runs past
    `max_chars` with no sentence end is cut at its last comma or space, so a
    reply with no punctuation still starts playing and the buffer stays bounded.

    Example:
        >>> buf = SentenceBuffer()
        >>> buf.push("Hello there. How a")
        ['Hello there.']
        >>> buf.push("re you?")
        []
        >>> buf.flush()
        ['How are you?']
    """

    def __init__(self, max_chars: int = 300) -> None:
        if max_chars < 1:
            raise ValueError(f"max_chars must be at least 1, got {max_chars}")
        self.max_chars = max_chars
        self._text = ""

    def push(self, fragment: str) -> list[str]:
        """Add a fragment of text; return the sentences it completed (maybe none)."""
        self._text += fragment
        cuts = _boundaries(self._text)
        done: list[str] = []
        if cuts:
            done = _pieces(self._text[: cuts[-1]], cuts[:-1])
            self._text = self._text[cuts[-1] :]
        while len(self._text) > self.max_chars:
            head = self._text[: self.max_chars]
            cut = max(head.rfind(", ") + 1, head.rfind(" "))
            cut = cut if cut > 0 else self.max_chars
            done.extend(_pieces(self._text[:cut], []))
            self._text = self._text[cut:]
        return done

    def flush(self) -> list[str]:
        """Return the remaining text as sentences and empty the buffer."""
        text, self._text = self._text, ""
        return split_sentences(text)

    def clear(self) -> None:
        """Drop buffered text (barge-in: the rest of the reply will not be spoken)."""
        self._text = ""
