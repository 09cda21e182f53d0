"""Word and sentence statistics for plain text."""

from textstats.core import average_word_length, sentence_count, top_words, word_count

__all__ = ["average_word_length", "sentence_count", "top_words", "word_count"]
