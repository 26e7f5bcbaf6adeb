"""Did-you-mean: the closest known name to a misspelt one (``sed`` -> ``seed``).

The known names always come from the registry that decides (the stages of
the file, a model's fields, ``merge/methods.py``, ``importers/registry.py``,
``backends/__init__.py``), so a suggestion can never name something that
would be refused in turn.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(word: object, known: Iterable[object]) -> str | None:
    """The known name most like ``word``, if one is close enough to be a typo of it."""
    names = [name for name in known if isinstance(name, str)]
    if not isinstance(word, str) or not names:
        return None
    found = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    return found[0] if found else None


def did_you_mean(word: object, known: Iterable[object]) -> str:
    """``"; did you mean 'seed'?"``, or nothing where no known name is close."""
    match = closest(word, known)
    return f"; did you mean {match!r}?" if match else ""
