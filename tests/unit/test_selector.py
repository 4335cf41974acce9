"""Label selectors (Calico's syntax): parsing, matching, canonical text, errors."""

from __future__ import annotations

import pytest

from wiremesh.clustermesh import SelectorError, parse_selector as parse

API = {"app": "api", "tier": "backend", "cluster": "west"}
FE = {"app": "frontend", "cluster": "east", "canary": "true"}
BARE: dict[str, str] = {}


@pytest.mark.parametrize("text, api, fe, bare", [
    ('app == "api"', True, False, False),
    ("app == 'api'", True, False, False),
    ('app != "api"', False, True, True),  # absent labels match != (Calico)
    ('app in {"api", "frontend"}', True, True, False),
    ('app not in {"api"}', False, True, True),
    ("has(canary)", False, True, False),
    ("!has(canary)", True, False, True),
    ("all()", True, True, True),
    ("", True, True, True),
    ('app == "api" || app == "frontend"', True, True, False),
    ('app == "api" && cluster == "east"', False, False, False),
    ('(app == "api" || has(canary)) && cluster == "east"', False, True, False),
    ('app == "api" || has(canary) && cluster == "west"', True, False, False),  # && binds tighter
    ('!(app == "api")', False, True, True),
    ('app starts with "front"', False, True, False),
    ('app ends with "end"', False, True, False),
    ('app contains "pi"', True, False, False),
    ('app in {}', False, False, False),
])
def test_matches(text: str, api: bool, fe: bool, bare: bool) -> None:
    sel = parse(text)
    assert (sel.matches(API), sel.matches(FE), sel.matches(BARE)) == (api, fe, bare)


def test_the_canonical_text_parses_back_to_the_same_selector() -> None:
    for text in ['app=="api"', "(a == 'x' || b in {'z','y'}) && !has(c)", "a == 'x' || (b == 'y' && c != 'z')",
                 'k8s.io/name starts with "w-"', "!(a == 'x' || b == 'y')"]:
        sel = parse(text)
        assert parse(str(sel)) == sel
    assert str(parse("b in {'z','y'}")) == 'b in {"y", "z"}'
    assert str(parse("(a == 'x' || b == 'y') && c == 'z'")) == '(a == "x" || b == "y") && c == "z"'
    assert parse('app=="api"') == parse("app == 'api'")


@pytest.mark.parametrize("text, pos, words", [
    ('app = "api"', 4, "unexpected character '='"),
    ('app == api', 7, "expected a quoted value"),
    ('app == "api', 7, "not closed"),
    ('app == "api" &&', 15, "found the end"),
    ('(app == "api"', 13, "expected ')'"),
    ('app in {"a" "b"}', 12, "expected ',' or '}'"),
    ('app', 3, "expected an operator after 'app'"),
    ('app == "x" app == "y"', 11, "expected && or ||"),
    ('has(=)', 4, "unexpected character"),
    ('-app == "x"', 0, "unexpected character '-'"),
    ('all(x)', 4, "all() takes nothing"),
])
def test_errors_name_the_position_and_the_reason(text: str, pos: int, words: str) -> None:
    with pytest.raises(SelectorError) as e:
        parse(text)
    assert e.value.pos == pos and words in e.value.reason, e.value.reason
    assert str(e.value).startswith(f"at character {pos + 1}: ")


def test_hostile_selectors_are_refused_not_recursed() -> None:
    with pytest.raises(SelectorError, match="nested more than"):
        parse("!" * 100 + 'a == "b"')
    with pytest.raises(SelectorError, match="nested more than"):
        parse("(" * 100 + 'a == "b"' + ")" * 100)
    with pytest.raises(SelectorError, match="longer than"):
        parse('a == "b" || ' * 1000 + 'a == "c"')
    with pytest.raises(SelectorError, match="label name"):
        parse(f'{"a" * 300} == "b"')
