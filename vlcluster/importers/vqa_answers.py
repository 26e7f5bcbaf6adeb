"""VQA answer normalisation, following the rules of the official VQA evaluation.

Annotators typed free text ("Two.", "2", "the dog", "dont know"); the official
evaluation compares answers only after: spacing and tabs collapsed;
punctuation removed (or turned into a space when it glues two words, unless the
answer holds a number like ``1,000``, where it is dropped everywhere); a period
dropped unless a digit follows; lower case; number words zero to ten written as
digits (and "none" as 0); the articles a, an, the dropped; common contractions
typed without their apostrophe given it back. Building the answer vocabulary and
the soft scores on answers normalised the same way keeps "two", "2" and "Two."
one answer, so a prediction scores what the official metric would give it.
"""

from __future__ import annotations

import re

PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")

# Contractions as they should read; the key of each is the same word typed without its
# apostrophes. Forms whose apostrophe-less spelling is itself a common word (we'll ->
# well, it's -> its, I'll -> ill, she'll -> shell, we'd -> wed) are not listed: they
# would rewrite real answers.
_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's "
    "should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've "
    "someone'll someone's something'd something'd've something'll that's there'd there'd've there're there's "
    "they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've "
    "when's where'd where's where've who'd who'd've who'll who're who's who've why'll why're why's won't "
    "would've wouldn't wouldn't've y'all y'all'd've you'd you'd've you'll you're you've"
).split()
CONTRACTIONS = {form.replace("'", ""): form for form in _CONTRACTIONS}


def _strip_punctuation(text: str) -> str:
    drop_everywhere = bool(_DIGIT_COMMA_DIGIT.search(text))
    out = text
    for mark in PUNCTUATION:
        # A mark beside a space (or anywhere in a number-holding answer) is dropped;
        # one between two characters ("black/white") separates two words.
        glued = f"{mark} " not in text and f" {mark}" not in text
        out = out.replace(mark, " " if glued and not drop_everywhere else "")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _canonical_words(text: str) -> str:
    words = (NUMBER_WORDS.get(word, word) for word in text.lower().split())
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalise_answer(answer: str) -> str:
    """``answer`` as the official VQA evaluation compares it."""
    return _canonical_words(_strip_punctuation(" ".join(answer.split())))
