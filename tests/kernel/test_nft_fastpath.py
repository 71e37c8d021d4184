"""The members-only fast path of `NftBackend.apply`: an address joining or leaving a group is one raw
element batch (no libnftables), touches conntrack only when a verdict can have tightened, and leaves a
table a restarted agent adopts exactly (revision included)."""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import pytest
from topo import open_stream, rule, state, stream_alive, tcp, tcp_connect, vnic

from omniwall.compiler.ir import HostDelta, IRSet, SetUpdate, diff
from omniwall.dataplane.nft.backend import normalized
from omniwall.dataplane.nft.libnft import NftError

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("root_untouched")]


@pytest.fixture
def trio(one_host):
    """One host; workloads a, b, c; an echo server on b:8080."""
    return one_host("a", "b", "c", serve=(("b", 8080),))


def guarded(rev, a, b, c, web, bad=()):
    """b accepts tcp/8080 from set 'web', except from set 'bad' (an emergency drop before it)."""
    rules = [
        rule(1, "allow"),
        rule(2, "drop", src="bad", category="emergency"),
        rule(3, "allow", src="web", services=(tcp(8080),)),
    ]
    vnics = [vnic(a, egress=(1,)), vnic(c, egress=(1,)), vnic(b, ingress=(2, 3))]
    sets = [IRSet("bad", tuple(sorted(bad))), IRSet("web", tuple(sorted(web)))]
    return state(rev, vnics, rules, sets)


def test_member_deltas_write_once_and_rejudge_only_what_can_tighten(trio, backends):
    h, a, b, c = trio
    be = backends(h)
    s1 = guarded(1, a, b, c, a.addresses)
    be.sync(s1)
    stream_a = open_stream(a.ns, b.ip4, 8080)
    try:
        assert stream_alive(stream_a)  # conntrack is not empty from here on
        writes, dumps = be.nft.writes, be.ct.dumps

        # c joins 'web' (only granting rules use it): one kernel write, no conntrack dump at all
        s2 = guarded(2, a, b, c, (*a.addresses, c.ip4))
        be.apply(s1, diff(s1, s2), s2)
        assert (be.nft.writes, be.nft.element_writes) == (writes + 1, 1)
        assert be.ct.dumps == dumps and be.last_revoked == []
        assert tcp_connect(c.ns, b.ip4, 8080) == "open"
        stream_c = open_stream(c.ns, b.ip4, 8080)
        assert stream_alive(stream_c)

        # c leaves 'web': one write; conntrack asked about c's address only, from the event-fed mirror
        # (no dump walks the table)
        s3 = guarded(3, a, b, c, a.addresses)
        be.apply(s2, diff(s2, s3), s3)
        assert (be.nft.writes, be.nft.element_writes) == (writes + 2, 2)
        assert be.ct.mirror is not None and be.ct.dumps == dumps
        assert {(e.src, e.dport) for e in be.last_revoked} == {(c.ip4, 8080)}  # the stream + the probe
        assert not stream_alive(stream_c)
        assert stream_alive(stream_a)  # untouched

        # a joins 'bad' (a refusing rule uses it): an addition that revokes
        s4 = guarded(4, a, b, c, a.addresses, bad=(a.ip4,))
        be.apply(s3, diff(s3, s4), s4)
        assert be.nft.writes == writes + 3
        assert {(e.src, e.dport) for e in be.last_revoked} == {(a.ip4, 8080)}
        assert not stream_alive(stream_a)
        assert tcp_connect(a.ns, b.ip4, 8080) == "timeout"
        assert normalized(be.realized()) == normalized(s4)
    finally:
        stream_a.close()


def test_restart_after_fast_path_adopts_members_and_revision(trio, backends):
    """kill -9 right after a fast-path apply: members and revision went in one transaction, so a new
    process reads back exactly the state it was told, and converges without writing."""
    h, a, b, c = trio
    first = backends(h)
    s1 = guarded(1, a, b, c, a.addresses)
    first.sync(s1)
    s = s1
    for rev in range(2, 7):
        members = (*a.addresses, *(f"10.99.0.{i}" for i in range(rev)), f"fd99::{rev:x}")
        n = guarded(rev, a, b, c, members)
        first.apply(s, diff(s, n), n)
        s = n
    assert first.nft.element_writes == 5
    first.close()  # no teardown: the table stays, as after a crash
    second = backends(h)
    assert normalized(second.realized()) == normalized(s)
    assert second.realized().revision == 6
    second.sync(s)
    assert second.nft.writes == 0


def test_non_member_deltas_take_the_general_path(trio, backends):
    h, a, b, c = trio
    be = backends(h)
    s1 = guarded(1, a, b, c, a.addresses)
    be.sync(s1)
    # a network in a set lives in an interval set: libnftables, not the raw batch
    s2 = replace(s1, revision=2, sets=(s1.sets[0], IRSet("web", s1.sets[1].addresses, ("10.0.0.3/32",))))
    be.apply(s1, diff(s1, s2), s2)
    assert be.nft.element_writes == 0 and be.nft.writes == 2
    assert tcp_connect(c.ns, b.ip4, 8080) == "open"
    assert normalized(be.realized()) == normalized(s2)


def test_one_member_delta_latency_on_a_big_table(trio, backends):
    """Prints the latency (no timed assert: shared machine). 2,000 rules over 20 synthetic vNICs and
    20k set members; the path's rules reference the set that changes."""
    h, a, b, c = trio
    be = backends(h)
    base = guarded(1, a, b, c, a.addresses)
    extra = tuple(f"10.{64 + i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(20_000))
    rules = [*base.rules] + [
        rule(100 + i, "allow", src="web", services=(tcp(20000 + i),)) for i in range(2000)
    ]
    synth = [
        replace(vnic(a, egress=tuple(range(100 + k * 100, 200 + k * 100))), ifname=f"owsyn{k}", addresses=())
        for k in range(20)
    ]
    s = replace(
        base,
        vnics=tuple(sorted((*base.vnics, *synth), key=lambda v: v.ifname)),
        rules=tuple(rules),
        sets=(base.sets[0], IRSet("web", tuple(sorted((*a.addresses, *extra))))),
    )
    be.sync(s)
    writes, elem_writes, times = be.nft.writes, be.nft.element_writes, []  # (a bulk sync: 2 and 1)
    for i in range(200):
        web = s.sets[1]
        members = (
            tuple(sorted((*web.addresses, "10.200.0.1")))
            if i % 2 == 0
            else tuple(x for x in web.addresses if x != "10.200.0.1")
        )
        n = replace(s, revision=s.revision + 1, sets=(s.sets[0], replace(web, addresses=members)))
        d = diff(s, n)
        t0 = time.perf_counter()
        be.apply(s, d, n)
        times.append(time.perf_counter() - t0)
        s = n
    assert be.nft.writes == writes + 200 and be.nft.element_writes == elem_writes + 200
    times.sort()
    print(
        f"\none-member delta, NftBackend.apply: median {statistics.median(times) * 1e3:.3f} ms, "
        f"p90 {times[180] * 1e3:.3f} ms (2k rules, 20k members)"
    )
    assert normalized(be.realized()) == normalized(s)


def test_refused_batch_changes_nothing_and_the_next_one_works(trio, backends):
    h, a, b, c = trio
    be = backends(h)
    s1 = guarded(1, a, b, c, a.addresses)
    be.sync(s1)
    web = s1.sets[1]
    # the delta claims a member the kernel does not hold: the kernel refuses the whole batch
    bogus = HostDelta("h", 1, 2, set_updates=(SetUpdate(web.name, removed_addresses=("10.55.0.1",)),))
    with pytest.raises(NftError, match="element batch"):
        be.apply(s1, bogus, replace(s1, revision=2))
    assert normalized(be.realized()) == normalized(s1)  # revision 1, members untouched
    s2 = guarded(2, a, b, c, (*a.addresses, c.ip4))
    be.apply(s1, diff(s1, s2), s2)
    assert normalized(be.realized()) == normalized(s2)
    assert tcp_connect(c.ns, b.ip4, 8080) == "open"


def test_async_revocation_returns_first_and_cuts_soon_after(trio, backends):
    """`revoke_async=True`: apply() returns after the kernel commit; the conntrack work (hash walks)
    runs on the namespace thread right after."""
    h, a, b, c = trio
    be = backends(h, revoke_async=True)
    s1 = guarded(1, a, b, c, (*a.addresses, c.ip4))
    be.sync(s1)
    stream_a, stream_c = open_stream(a.ns, b.ip4, 8080), open_stream(c.ns, b.ip4, 8080)
    try:
        assert stream_alive(stream_a) and stream_alive(stream_c)
        s2 = guarded(2, a, b, c, a.addresses)  # c leaves 'web'
        be.apply(s1, diff(s1, s2), s2)
        be.wait_revocation()
        assert {(e.src, e.dport) for e in be.last_revoked} == {(c.ip4, 8080)}
        assert not stream_alive(stream_c) and stream_alive(stream_a)
        # members added to a set only allow rules use: nothing queued at all
        s3 = guarded(3, a, b, c, (*a.addresses, "10.55.0.1"))
        be.apply(s2, diff(s2, s3), s3)
        assert be._revocations == []
    finally:
        stream_a.close()
        stream_c.close()
