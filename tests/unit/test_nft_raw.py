"""Pure tests of the raw nfnetlink encoder (nlrules.py) and of the applier's in-place chain edit
(backend.edit_chains). The kernel comparison against libnftables is tests/kernel/test_nft_raw_netns.py."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from nft_rich import ALL_KINDS, kinds, rich_state
from omniwall.dataplane.nft import nlrules
from omniwall.dataplane.nft.backend import edit_chains
from omniwall.dataplane.nft.nlrules import Unsupported, encode_commands
from omniwall.dataplane.nft.render import render_table

T = {"family": "inet", "table": "omniwall"}


def attrs(b: bytes) -> dict[int, bytes]:
    out, off = {}, 0
    while off + 4 <= len(b):
        ln, typ = struct.unpack_from("=HH", b, off)
        out[typ & 0x7FFF] = b[off + 4 : off + ln]
        off += (ln + 3) & ~3
    return out


def test_every_kind_of_the_rich_table_encodes():
    cmds = render_table(rich_state(), flow_group=16)
    assert kinds(cmds) == ALL_KINDS
    msgs, enc = encode_commands("inet", "omniwall", cmds)
    assert len([m for m in msgs if m[0] == nlrules.NEWRULE]) == sum("rule" in c.get("add", {}) for c in cmds)
    enc.commit_known()
    assert enc.known["mxre_" + next(n[5:] for n in enc.known if n.startswith("mxre_"))].interval


@pytest.mark.parametrize(
    "expr",
    [
        {"match": {"op": "==", "left": {"meta": {"key": "length"}}, "right": 1}},
        {"match": {"op": "<", "left": {"payload": {"protocol": "th", "field": "dport"}}, "right": 1}},
        {
            "match": {"op": "==", "left": {"payload": {"protocol": "icmp", "field": "type"}}, "right": 8}
        },  # no l4
        {"queue": {"num": 1}},
        {"reject": {"type": "tcp reset"}},  # without meta l4proto tcp first
        {"vmap": {"key": {"meta": {"key": "iifname"}}, "data": "@not_declared"}},
    ],
)
def test_unknown_forms_are_refused_before_anything_is_sent(expr):
    with pytest.raises(Unsupported):
        encode_commands("inet", "omniwall", [{"add": {"rule": {**T, "chain": "c", "expr": [expr]}}}])


def test_rule_positions_and_deletes_by_handle():
    rule = {**T, "chain": "c", "expr": [{"accept": None}], "comment": "x"}
    msgs, _ = encode_commands(
        "inet",
        "omniwall",
        [
            {"add": {"rule": {**rule, "handle": 7}}},
            {"insert": {"rule": {**rule, "handle": 8}}},
            {"delete": {"rule": {**T, "chain": "c", "handle": 9}}},
        ],
    )
    (t1, f1, b1), (t2, f2, b2), (t3, _f3, b3) = msgs
    assert (t1, t2, t3) == (nlrules.NEWRULE, nlrules.NEWRULE, nlrules.DELRULE)
    assert f1 & nlrules.F_APPEND and not f2 & nlrules.F_APPEND  # after 7; before 8
    assert attrs(b1)[6] == struct.pack("!Q", 7) and attrs(b2)[6] == struct.pack("!Q", 8)
    assert attrs(b3)[3] == struct.pack("!Q", 9) and attrs(b3)[2] == b"c\0"


def test_the_expression_cache_keeps_the_rule_context():
    """The same `ip saddr` match after a `meta nfproto ipv4` match needs no dependency of its own."""
    saddr = {
        "match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "10.0.0.1"}
    }
    v4 = {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv4"}}
    cache: nlrules.Cache = {}
    cmds = [{"add": {"rule": {**T, "chain": "c", "expr": e}}} for e in ([saddr], [v4, saddr], [saddr])]
    msgs, _ = encode_commands("inet", "omniwall", cmds, cache=cache)
    exprs = [attrs(b)[4] for _t, _f, b in msgs]
    assert exprs[0] == exprs[2] and exprs[0] == exprs[1]  # dependency + load + cmp, all three
    assert cache


@pytest.mark.parametrize(
    "stmt",
    [
        {"counter": None},
        {"accept": None},
        {"drop": None},
        {"continue": None},
        {"return": None},
        {"notrack": None},
        {"log": {"prefix": "owf:370:a:i", "group": 16}},
        {"log": {"prefix": "ow:7:drop ", "group": 0}},
        {"mangle": {"key": {"ct": {"key": "mark"}}, "value": 370}},
        {"mangle": {"key": {"ct": {"key": "mark"}}, "value": 0xFFFFFFFF}},
    ],
)
def test_statement_fast_path_is_the_general_encoding(stmt: dict[str, Any]) -> None:
    """Every rule's own statements skip the cache (nlrules._fast_stmt): the same bytes as the general
    path (_Rule.stmt), and no cache entry for them."""
    ((kind, arg),) = stmt.items()
    fast = nlrules._fast_stmt(kind, arg)
    r = nlrules._Rule(nlrules.RuleEncoder("inet", "omniwall", {}), "omniwall")
    r.stmt(stmt)
    assert fast is not None and fast == b"".join(r.out)
    cache: nlrules.Cache = {}
    msgs, _ = encode_commands("inet", "omniwall", [{"add": {"rule": {**T, "chain": "c", "expr": [stmt]}}}],
                              cache=cache)  # fmt: skip
    assert attrs(attrs(msgs[0][2])[4]) == attrs(fast) and not cache


@pytest.mark.parametrize(
    "stmt",
    [
        {"log": {"prefix": "x", "group": 70000}},  # out of range: the general path decides (refuses)
        {"mangle": {"key": {"ct": {"key": "mark"}}, "value": True}},
        {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 1}},
        {"goto": {"target": "c"}},  # cached by the general path
    ],
)
def test_statement_fast_path_leaves_other_forms_alone(stmt: dict[str, Any]) -> None:
    ((kind, arg),) = stmt.items()
    assert nlrules._fast_stmt(kind, arg) is None


class FakeNft:
    def __init__(self, rules: list[tuple[int, str | None]]) -> None:
        self.rules = rules
        self.dumps = 0

    def rule_handles(self, family: str, table: str, chain: str) -> list[tuple[int, str | None]] | None:
        self.dumps += 1
        return self.rules


def _r(comment: str, port: int = 0) -> dict[str, Any]:
    return {"expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}},
                                "right": port}}, {"accept": None}], "comment": comment}  # fmt: skip


def _cmds(chain: str, rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"flush": {"chain": {**T, "name": chain}}},
        {"add": {"chain": {**T, "name": chain}}},
        *({"add": {"rule": {**T, "chain": chain, **r}}} for r in rules),
    ]


def test_a_changed_rule_is_replaced_in_place():
    old = [_r("1"), _r("2"), _r("3"), _r("next")]
    new = [_r("1"), _r("2", 99), _r("3"), _r("next")]
    nft = FakeNft([(10, "1"), (11, "2"), (12, "3"), (13, "next")])
    out = edit_chains(nft, _cmds("c", new), {"c": old})  # type: ignore[arg-type]
    assert out == [
        {"add": {"chain": {**T, "name": "c"}}},
        {"delete": {"rule": {**T, "chain": "c", "handle": 11}}},
        {"insert": {"rule": {**T, "chain": "c", **_r("2", 99), "handle": 12}}},
    ]


def test_rules_added_at_the_end_are_appended_in_order():
    old = [_r("1"), _r("2"), _r("5"), _r("6"), _r("7")]
    new = [_r("1"), _r("2"), _r("5"), _r("6"), _r("3"), _r("4")]
    dump = [(5, "1"), (6, "2"), (7, "5"), (8, "6"), (9, "7")]
    out = edit_chains(FakeNft(dump), _cmds("c", new), {"c": old})  # type: ignore[arg-type]
    assert out[1:] == [
        {"delete": {"rule": {**T, "chain": "c", "handle": 9}}},
        {"add": {"rule": {**T, "chain": "c", **_r("3")}}},
        {"add": {"rule": {**T, "chain": "c", **_r("4")}}},
    ]


@pytest.mark.parametrize("dump", [None, [(10, "1"), (11, "x"), (12, "3"), (13, "next")], [(10, "1")]])
def test_a_chain_not_as_remembered_is_flushed_and_refilled(dump):
    old = [_r("1"), _r("2"), _r("3"), _r("next")]
    new = [_r("1"), _r("2", 99), _r("3"), _r("next")]
    cmds = _cmds("c", new)
    assert edit_chains(FakeNft(dump), cmds, {"c": old}) == cmds  # type: ignore[arg-type]


def test_nothing_in_common_needs_no_dump():
    nft = FakeNft([(1, "a")])
    cmds = _cmds("c", [_r("b")])
    assert edit_chains(nft, cmds, {"c": [_r("a")]}) == cmds  # type: ignore[arg-type]
    assert nft.dumps == 0


@pytest.mark.parametrize("name", ["web", "wéb ✓"])
def test_stored_ir_bytes_do_not_depend_on_the_json_encoder(name):
    """blob._pack encodes with msgspec; the chunks must stay json.dumps' (read-back compares them)."""
    import base64
    import json
    import zlib
    from dataclasses import replace

    from omniwall.dataplane.nft import blob

    s = rich_state()
    s = replace(s, rules=tuple(replace(r, rule=f"{name}{r.id}") for r in s.rules))
    for data in ({"rules": [r.rule for r in s.rules], "n": 1, "x": None, "t": True}, blob.structure(s)):
        raw = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        text = blob.MAGIC2 + base64.b64encode(zlib.compress(raw, 9)).decode()
        assert "".join(blob._pack(blob.MAGIC2, data)) == text


def test_the_planners_rule_encoding_is_ir_plain_as_json():
    import json

    from omniwall.compiler.ir import plain
    from omniwall.dataplane.nft.planner import PlainRules

    enc = PlainRules()
    for r in rich_state().rules:
        assert json.dumps(enc(r), sort_keys=True) == json.dumps(plain(r), sort_keys=True)
