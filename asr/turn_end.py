"""Has the speaker finished? A reading of the words, for the endpointer.

Silence alone is a poor judge of the end of a turn: people pause inside
sentences ("can you tell me how to get to ... the station") and stop after
plainly finished ones. Streaming assistants therefore ask a second judge at
a short pause: a turn-taking model (Pipecat's Smart Turn, LiveKit's turn
detector) or, as here, the transcript itself. Whisper punctuates what it
hears, so a transcript that ends in a full stop or a question mark after a
word that can end a sentence has very likely been finished; one that trails
off in "the", "and", "um" or a comma has not.

The rule is deliberately small and conservative about "finished": a wrong
"finished" cuts the speaker off, a wrong "unfinished" only waits longer.
`scripts/endpoint_sweep.py` measures both errors on recordings with pauses.
"""
from __future__ import annotations

import re

__all__ = ["looks_finished"]

# Words after which an English sentence goes on: articles, possessives, "to" and "of", conjunctions and
# fillers. A transcript ending in one of them was cut mid-sentence, whatever Whisper's punctuation says
# ("Can you tell me how to get to the."). Pronouns, auxiliaries and most prepositions are left out on
# purpose: they end plenty of finished questions ("Who are you?", "Where is it?", "Where are you from?").
_GOES_ON = frozenset("""
a an the my your our their his her its every
to of
and or but so because if than nor
um uh er erm hmm
""".split())

# A statement that ends in a preposition ("I'd like a table for.") has lost its object; a question may
# end in one ("What are you looking for?").
_PREPOSITIONS = frozenset("for with at in on from about into by".split())
# A question word last, after a longer start ("Do you know when?"), is where the speaker stopped to think.
_QUESTION_WORDS = frozenset("when where what which who why how".split())

_TRAILING = re.compile(r"(\.\.\.|…|[,;:\-–—])\s*$")
_WORD = re.compile(r"[A-Za-z']+|\d+")


def looks_finished(text: str) -> bool:
    """True when `text` (a raw transcript) reads as a finished sentence or question.

    >>> looks_finished("What time does the library open on Saturday?")
    True
    >>> looks_finished("Can you tell me how to get to the")
    False
    >>> looks_finished("I'd like to book a table for, um...")
    False
    """
    text = text.strip()
    if not text or _TRAILING.search(text) or text[-1] not in ".?!":
        return False
    words = [w.lower() for w in _WORD.findall(text)]
    if not words or words[-1] in _GOES_ON:
        return False
    if text[-1] == "." and words[-1] in _PREPOSITIONS:
        return False
    return not (len(words) >= 3 and words[-1] in _QUESTION_WORDS)
