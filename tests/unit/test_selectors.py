"""Selector language: parsing, every operator, precedence, missing keys, list facts, errors."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from omniwall.selectors import Selector, SelectorError, canonical, facts_of, parse

WEB = {"tier": "web", "env": "prod"}


@pytest.mark.parametrize(
    ("text", "facts", "expected"),
    [
        ('tier == "web"', WEB, True),
        ('tier == "app"', WEB, False),
        ('tier != "app"', WEB, True),
        ('tier != "web"', WEB, False),
        ('env in {"prod", "stage"}', WEB, True),
        ('env in {"dev"}', WEB, False),
        ('env not in {"dev", "test"}', WEB, True),
        ('env not in {"prod"}', WEB, False),
        ("env in {}", WEB, False),
        ("env not in {}", WEB, True),
        ("has(tier)", WEB, True),
        ("has(quarantine)", WEB, False),
        ("!has(quarantine)", WEB, True),
        ("all()", {}, True),
        ("!all()", WEB, False),
        ('tier == "web" && env == "prod"', WEB, True),
        ('tier == "web" && env == "dev"', WEB, False),
        ('tier == "app" || env == "prod"', WEB, True),
        ('tier == "app" || env == "dev"', WEB, False),
        ('!(tier == "web")', WEB, False),
        ('tier == "web" && env in {"prod","stage"} && !has(quarantine)', WEB, True),
    ],
)
def test_operators(text: str, facts: dict[str, object], expected: bool) -> None:
    assert parse(text).matches(facts) is expected


def test_precedence_and_binds_tighter_than_or() -> None:
    s = parse('a == "1" || b == "1" && c == "1"')  # a || (b && c)
    assert s.matches({"a": "1"})
    assert not s.matches({"b": "1"})
    assert s.matches({"b": "1", "c": "1"})
    assert s == parse('a == "1" || (b == "1" && c == "1")')
    assert s != parse('(a == "1" || b == "1") && c == "1"')
    assert not parse('(a == "1" || b == "1") && c == "1"').matches({"a": "1"})


def test_not_binds_to_the_next_comparison_only() -> None:
    s = parse('!a == "1" && b == "1"')  # (!(a == "1")) && b == "1"
    assert s.matches({"a": "2", "b": "1"})
    assert not s.matches({"a": "1", "b": "1"})
    assert parse("!!has(a)").matches({"a": "x"})


def test_missing_key() -> None:
    assert not parse('tier == "web"').matches({})
    assert not parse('tier in {"web"}').matches({})
    assert parse('tier != "web"').matches({})
    assert parse('tier not in {"web"}').matches({})
    assert not parse("has(tier)").matches({})
    assert not parse("has(tier)").matches({"tier": None})


def test_list_facts_match_any_element() -> None:
    facts = {"user": ["alice", "bob"]}
    assert parse('user == "alice"').matches(facts)
    assert parse('user in {"bob", "carol"}').matches(facts)
    assert not parse('user == "carol"').matches(facts)
    # != and not in are the exact negations of == and in
    assert not parse('user != "alice"').matches(facts)
    assert parse('user != "carol"').matches(facts)
    assert not parse('user not in {"carol", "bob"}').matches(facts)
    assert parse('user not in {"carol"}').matches(facts)
    assert parse("has(user)").matches({"user": []})
    assert not parse('user == "alice"').matches({"user": []})


def test_values_compare_as_canonical_strings() -> None:
    assert parse("replicas == 3").matches({"replicas": 3})
    assert parse('replicas == "3"').matches({"replicas": 3})
    assert parse("replicas == 3").matches({"replicas": "3"})
    assert parse("replicas == 3.0").matches({"replicas": 3})
    assert parse("ratio == 0.5").matches({"ratio": 0.5})
    assert parse("patched == true").matches({"patched": True})
    assert parse('patched == "false"').matches({"patched": False})
    assert not parse("patched == true").matches({"patched": "True"})
    assert parse("delta == -2").matches({"delta": -2})
    assert canonical(2.0) == "2" and canonical(True) == "true" and canonical(1.25) == "1.25"


@pytest.mark.parametrize(
    "key",
    ["os.family", "av.status", "app.kubernetes.io/name", "kubernetes.io/metadata.name", "_x-1", "notx", "in"],
)
def test_key_forms(key: str) -> None:
    s = parse(f'{key} == "v"')
    assert s.keys == frozenset({key})
    assert s.matches({key: "v"})


def test_quoted_key() -> None:
    s = parse('label("has") == "x" && has(label("a b")) && label("tier") == "web"')
    assert s.keys == frozenset({"has", "a b", "tier"})
    assert s.matches({"has": "x", "a b": "", "tier": "web"})
    assert parse('label("q\\"uote") == "v"').keys == frozenset({'q"uote'})


def test_keys() -> None:
    s = parse('tier == "web" && (env in {"prod"} || !has(quarantine)) && os.family != "windows"')
    assert s.keys == frozenset({"tier", "env", "quarantine", "os.family"})
    assert parse("all()").keys == frozenset()


def test_escapes_in_strings() -> None:
    assert parse(r'msg == "a\"b\\c"').matches({"msg": 'a"b\\c'})
    assert parse(r'msg == "tab\there"').matches({"msg": "tab\there"})


def test_text_and_canonical_form() -> None:
    s = parse('  env in {"stage","prod","prod"}&&!(tier=="web")||x==1 ')
    assert s.text == '  env in {"stage","prod","prod"}&&!(tier=="web")||x==1 '
    assert str(s) == 'env in {"prod", "stage"} && !tier == "web" || x == "1"'
    assert parse(str(s)) == s
    assert str(parse('(a == "1" || b == "2") && c == "3"')) == '(a == "1" || b == "2") && c == "3"'
    assert str(parse('has(label("in"))')) == 'has(label("in"))'
    assert parse('env in {"a", "b"}') == parse('env in {"b","a"}')


def test_parse_is_cached() -> None:
    assert parse('tier == "cached"') is parse('tier == "cached"')


@pytest.mark.parametrize(
    ("text", "column", "fragment"),
    [
        ('tier = "web"', 6, "expected '==', '!=', 'in' or 'not in', got '='"),
        ('tier == "web', 9, "unterminated string"),
        ("tier == 'web'", 9, "strings use double quotes"),
        ("tier == web", 9, 'strings need double quotes: "web"'),
        ("tier ==", 8, "unexpected end of selector, expected a string"),
        ('a == "x" & b == "y"', 10, "got '&' (use '&&')"),
        ('(a == "x"', 10, "expected '&&', '||' or ')'"),
        ('a == "x")', 9, "got ')'"),
        ('a in "x"', 6, "expected '{'"),
        ('a in {"x" "y"}', 11, "expected '}' or ','"),
        ("has(1)", 5, "expected a key"),
        ('has == "x"', 5, "expected '('"),
        ("", 1, "empty selector"),
        ("&& a", 1, "expected a key"),
    ],
)
def test_errors_name_the_column(text: str, column: int, fragment: str) -> None:
    with pytest.raises(SelectorError) as info:
        parse(text)
    assert info.value.column == column
    message = str(info.value)
    assert message.startswith(f"selector {text!r}: column {column}: ")
    assert fragment in message
    assert isinstance(info.value, ValueError)


def test_error_pickles() -> None:
    with pytest.raises(SelectorError) as info:
        parse('tier = "web"')
    again = pickle.loads(pickle.dumps(info.value))
    assert (str(again), again.column, again.line) == (str(info.value), 6, 1)


def test_error_in_a_multiline_selector_names_the_line() -> None:
    with pytest.raises(SelectorError) as info:
        parse('tier == "web" &&\n  env = "prod"')
    assert (info.value.line, info.value.column) == (2, 7)
    assert ": line 2, column 7: " in str(info.value)


def test_facts_of_merges_and_label_wins() -> None:
    facts = facts_of({"tier": "web", "os.family": "label"}, {"os.family": "linux", "user": ["a"]})
    assert facts == {"tier": "web", "os.family": "label", "user": ["a"]}
    assert facts_of(None, None) == {}
    assert parse('os.family == "label" && user == "a"').matches(facts)


def test_selector_type() -> None:
    s = parse("all()")
    assert isinstance(s, Selector)
    assert s.text == "all()"


# Property: the canonical form re-parses to an equal selector that matches the same facts.
_keys = st.sampled_from(["a", "b", "os.family", "in", "has", "x y"])
_vals = st.sampled_from(["1", "web", "", 'q"t', "true"])


def _leaf() -> st.SearchStrategy[str]:
    def key(k: str) -> str:
        return k if k in ("a", "b", "os.family") else f'label("{k}")'

    def val(v: str) -> str:
        return '"' + v.replace('"', '\\"') + '"'

    return st.one_of(
        st.builds(lambda k, v: f"{key(k)} == {val(v)}", _keys, _vals),
        st.builds(lambda k, v: f"{key(k)} != {val(v)}", _keys, _vals),
        st.builds(lambda k, vs: f"{key(k)} in {{{', '.join(map(val, vs))}}}", _keys, st.lists(_vals)),
        st.builds(lambda k, vs: f"{key(k)} not in {{{', '.join(map(val, vs))}}}", _keys, st.lists(_vals)),
        st.builds(lambda k: f"has({key(k)})", _keys),
        st.just("all()"),
    )


_exprs = st.recursive(
    _leaf(),
    lambda inner: st.one_of(
        st.builds(lambda e: f"!({e})", inner),
        st.builds(lambda a, b: f"{a} && {b}", inner, inner),
        st.builds(lambda a, b: f"({a}) || {b}", inner, inner),
    ),
    max_leaves=8,
)
_facts = st.dictionaries(_keys, st.one_of(_vals, st.lists(_vals, max_size=2)), max_size=4)


@given(_exprs, _facts)
def test_canonical_form_round_trips(text: str, facts: dict[str, object]) -> None:
    s = parse(text)
    again = parse(str(s))
    assert again == s
    assert str(again) == str(s)
    assert again.matches(facts) == s.matches(facts)
