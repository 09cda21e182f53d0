from textstats import average_word_length, sentence_count, top_words, word_count


def test_word_count():
    assert word_count("The cat sat. The cat ran!") == 6


def test_average_word_length():
    assert average_word_length("ab abcd") == 3.0


def test_average_word_length_of_empty_text_is_zero():
    assert average_word_length("") == 0.0


def test_sentence_count_knows_questions_and_exclamations():
    assert sentence_count("Hi. How are you? Great!") == 3


def test_top_words_breaks_ties_alphabetically():
    assert top_words("b a c b a c d", n=2) == ["a", "b"]
