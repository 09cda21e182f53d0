from csvlite import parse_line, read_rows, to_dicts


def test_plain_fields():
    assert parse_line("a,b,c") == ["a", "b", "c"]


def test_quoted_field_keeps_its_separator():
    assert parse_line('a,"b,c",d') == ["a", "b,c", "d"]


def test_other_separator():
    assert parse_line("a;b;c", sep=";") == ["a", "b", "c"]


def test_doubled_quote_is_a_literal_quote():
    assert parse_line('"say ""hi""",x') == ['say "hi"', "x"]


def test_empty_fields_are_kept():
    assert parse_line("a,,b") == ["a", "", "b"]
    assert parse_line("a,b,") == ["a", "b", ""]


def test_rows_with_crlf_line_ends():
    assert read_rows("a,b\r\nc,d\r\n") == [["a", "b"], ["c", "d"]]


def test_quoted_line_break_stays_in_its_field():
    assert read_rows('id,note\n1,"two\nlines"\n2,x\n') == [
        ["id", "note"], ["1", "two\nlines"], ["2", "x"]
    ]


def test_dicts_fill_short_rows():
    assert to_dicts("id,name,team\n1,ada\n") == [{"id": "1", "name": "ada", "team": ""}]
