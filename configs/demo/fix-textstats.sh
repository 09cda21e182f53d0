# The interim demo's "agent": runs the tests, fixes the three bugs, adds a test, reruns.
set -e
echo "== tests before the fix"
python3 -m pytest -q -p no:cacheprovider || true
python3 - <<'PY'
import re, pathlib
core = pathlib.Path("textstats/core.py")
src = core.read_text()
src = src.replace("    return sum(len(w) for w in ws) / len(ws)",
                  "    return sum(len(w) for w in ws) / len(ws) if ws else 0.0")
src = src.replace('    return len([s for s in text.split(".") if s.strip()])',
                  '    return len([s for s in re.split(r"[.?!]", text) if s.strip()])')
src = src.replace("    return [w for w, _ in counts.most_common(n)]",
                  "    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]")
core.write_text(src)
pathlib.Path("tests/test_words.py").write_text(
    "from textstats.core import words\n\n\ndef test_words_are_lower_case():\n"
    "    assert words(\"Hello World\") == [\"hello\", \"world\"]\n")
PY
echo "== tests after the fix"
python3 -m pytest -q -p no:cacheprovider
