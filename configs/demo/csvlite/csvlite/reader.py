"""Reading CSV text (RFC 4180): fields separated by `sep`, optionally in double quotes;
inside quotes a doubled quote ("") is one literal quote, and separators and line breaks
are plain text."""


def parse_line(line, sep=","):
    """The fields of one line: 'a,"b,c",d' -> ['a', 'b,c', 'd']."""
    fields, field, quoted = [], "", False
    for ch in line:
        if ch == '"':
            quoted = not quoted
            continue
        if ch == sep and not quoted:
            fields.append(field)
            field = ""
            continue
        field += ch
    if field:
        fields.append(field)
    return fields


def read_rows(text, sep=","):
    """Every row of `text` (\n or \r\n line ends; no row for a final line break)."""
    return [parse_line(line, sep) for line in text.split("\n") if line]


def to_dicts(text, sep=","):
    """Rows as dicts keyed by the header row; a short row's missing fields are ''."""
    header, *rows = read_rows(text, sep)
    return [dict(zip(header, row)) for row in rows]
