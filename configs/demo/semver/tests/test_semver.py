import pytest

from semver import Version, bump, compare, parse


def test_parse_core():
    assert parse("1.2.3") == Version(1, 2, 3)


def test_parse_prerelease():
    assert parse("1.0.0-rc.1").prerelease == ("rc", "1")


def test_parse_build_metadata():
    assert parse("1.2.3+build.5").build == ("build", "5")
    v = parse("1.0.0-rc.1+exp.sha.5114f85")
    assert (v.prerelease, v.build) == (("rc", "1"), ("exp", "sha", "5114f85"))


def test_parse_rejects_garbage():
    with pytest.raises(ValueError):
        parse("1.2")


def test_str_round_trips():
    for text in ["1.2.3", "1.0.0-alpha.1", "2.0.0-rc.1+build.7"]:
        assert str(parse(text)) == text


def test_compare_numbers_numerically():
    assert compare("1.10.0", "1.9.0") == 1
    assert compare("2.0.0", "10.0.0") == -1


def test_compare_equal():
    assert compare("1.2.3", "1.2.3") == 0


def test_a_prerelease_comes_before_its_release():
    assert compare("1.0.0-rc.1", "1.0.0") == -1
    assert compare("1.0.0", "1.0.0-alpha") == 1


def test_prerelease_precedence_follows_the_spec():
    ordered = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta",
               "1.0.0-beta.2", "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0"]  # fmt: skip
    for lower, higher in zip(ordered, ordered[1:]):
        assert compare(lower, higher) == -1, f"{lower} < {higher}"


def test_build_metadata_does_not_count():
    assert compare("1.0.0+a", "1.0.0+b") == 0


def test_bump_major():
    assert bump("1.2.3", "major") == Version(2, 0, 0)


def test_bump_minor_resets_patch():
    assert bump("1.2.3", "minor") == Version(1, 3, 0)


def test_bump_patch():
    assert bump("1.2.3", "patch") == Version(1, 2, 4)
