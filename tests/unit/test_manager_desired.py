"""DesiredStates.apply: the compiler's deltas are stored and sent as they are, rebased on the book's own
host revisions; a host's state is apply_delta(previous, delta), sharing what the delta did not touch;
revisions change only with content and chain."""

from __future__ import annotations

from omniwall.compiler.ir import HostDelta, HostDesiredState, IRSet, SetUpdate, diff, empty_state
from omniwall.manager.desired import DesiredStates

S1 = IRSet("s", ("10.0.0.1",))
S2 = IRSet("s", ("10.0.0.1", "10.0.0.2"))
T = IRSet("t", ("10.0.1.1",))


def test_apply_rebases_logs_and_shares_untouched_parts() -> None:
    ds = DesiredStates()
    ds.update({"h": HostDesiredState("h", 5, sets=(S1, T))}, 5)  # a full rebuild at 5
    base = ds.snapshot("h")
    assert base is not None
    # the compiler numbers the host from its own rebuild (here 9): the book rebases on 5
    d = HostDelta("h", 9, 12, set_updates=(SetUpdate("s", added_addresses=("10.0.0.2",), result=S2),))
    (logged,) = ds.apply({"h": d})
    assert (logged.from_revision, logged.to_revision) == (5, 12)
    st = ds.snapshot("h")
    assert st is not None and st.revision == 12 and st.sets == (S2, T)
    assert st.sets[0] is S2 and st.sets[1] is T and st.vnics is base.vnics  # nothing rebuilt
    assert ds.deltas_since("h", 5) == [logged]
    # an empty delta changes nothing: same revision, nothing logged or sent
    assert ds.apply({"h": HostDelta("h", 12, 13)}) == []
    assert ds.revision("h") == 12 and ds.deltas_since("h", 12) == []


def test_a_new_host_gets_its_state_without_a_log_entry_and_a_removed_one_an_empty_state() -> None:
    ds = DesiredStates()
    new = HostDesiredState("n", 3, sets=(T,))
    assert ds.apply({"n": diff(empty_state("n", 0), new)}) == []
    assert ds.snapshot("n") == new
    assert ds.deltas_since("n", 1) is None  # unknown revision: the feed sends a snapshot
    (gone,) = ds.apply({"n": diff(new, empty_state("n", 4))})
    assert ds.snapshot("n") == empty_state("n", 4) and gone.from_revision == 3


def test_a_change_to_many_hosts_freezes_what_it_left_and_a_small_one_does_not() -> None:
    import gc

    from omniwall.manager.desired import FREEZE_HOSTS

    ds = DesiredStates()
    hosts = [f"h{i}" for i in range(FREEZE_HOSTS)]
    ds.update({h: HostDesiredState(h, 1, sets=(S1,)) for h in hosts}, 1)
    before = gc.get_freeze_count()
    try:
        up = SetUpdate("s", added_addresses=("10.0.0.2",), result=S2)
        assert (
            len(ds.apply({h: HostDelta(h, 1, 2, set_updates=(up,)) for h in hosts[:-1]})) == FREEZE_HOSTS - 1
        )
        assert gc.get_freeze_count() == before  # one host short: left to the collector
        assert len(ds.apply({h: HostDelta(h, 2, 3, set_updates=(up,)) for h in hosts})) == FREEZE_HOSTS
        frozen = gc.get_freeze_count()
        assert frozen > before
    finally:
        gc.unfreeze()  # the test process's other objects back to the collector
