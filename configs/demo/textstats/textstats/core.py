"""Counting words and sentences."""

import re
from collections import Counter

_WORD = re.compile(r"[A-Za-z']+")


def words(text):
    """The words of `text`, lower-cased."""
    return [w.lower() for w in _WORD.findall(text)]


def word_count(text):
    return len(words(text))


def average_word_length(text):
    ws = words(text)
    # BUG: an empty text divides by zero instead of returning 0.0
    return sum(len(w) for w in ws) / len(ws)


def sentence_count(text):
    # BUG: "?" and "!" also end sentences
    return len([s for s in text.split(".") if s.strip()])


def top_words(text, n=3):
    """The `n` most common words, most common first; ties in alphabetical order."""
    counts = Counter(words(text))
    # BUG: ties are not broken alphabetically
    return [w for w, _ in counts.most_common(n)]
