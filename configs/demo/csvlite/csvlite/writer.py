"""Writing CSV lines."""


def format_line(fields, sep=","):
    """One CSV line. A field holding the separator, a quote or a line break is put in
    quotes, and its own quotes are doubled: ["a", "b,c"] -> 'a,"b,c"'.
    """
    out = []
    for field in fields:
        text = str(field)
        if sep in text or '"' in text or "\n" in text or "\r" in text:
            text = '"' + text.replace('"', '""') + '"'
        out.append(text)
    return sep.join(out)
