"""Candidate order: primary nodes first, fallbacks after, least in flight, round-robin ties, panic."""

from llmha.core.candidates import CandidatePicker
from llmha.core.nodes import NodePool
from llmha.core.profile import Profile, Upstream
from llmha.core.types import NodeId as Node

T0 = 1_000_000.0
PROFILE = Profile(path="c.yaml", upstreams=(
    Upstream("primary", ("http://127.0.0.1:1", "http://127.0.0.1:2")),
    Upstream("backup", ("http://127.0.0.1:3",)),
    Upstream("last", ("http://127.0.0.1:4",)),
))
A, B = Node("primary", "http://127.0.0.1:1"), Node("primary", "http://127.0.0.1:2")
BACKUP, LAST = Node("backup", "http://127.0.0.1:3"), Node("last", "http://127.0.0.1:4")


def setup(profile=PROFILE):
    return CandidatePicker(profile), NodePool(profile, T0)


def order(picker, tracker, now=T0):
    return [c.node for c in picker.candidates(tracker, now)]


def test_upstreams_in_profile_order_and_round_robin_between_idle_nodes():
    picker, tracker = setup()
    assert order(picker, tracker) == [A, B, BACKUP, LAST]
    assert order(picker, tracker) == [B, A, BACKUP, LAST]
    assert order(picker, tracker) == [A, B, BACKUP, LAST]


def test_least_in_flight_first():
    picker, tracker = setup()
    tracker.try_acquire(A, T0, streamed=True)
    assert [order(picker, tracker)[0] for _ in range(4)] == [B, B, B, B]


def test_ejected_nodes_are_skipped_and_the_fallback_follows():
    picker, tracker = setup()
    tracker.eject(A, T0)
    tracker.eject(B, T0)
    assert order(picker, tracker, T0 + 1) == [BACKUP, LAST]


def test_all_ejected_tries_every_node_soonest_return_first():
    picker, tracker = setup()
    tracker.eject(BACKUP, T0)
    tracker.eject(LAST, T0 + 1)
    tracker.eject(A, T0 + 2)
    tracker.eject(B, T0 + 3)
    assert order(picker, tracker, T0 + 4) == [BACKUP, LAST, A, B]


def test_only_the_primary_candidate_is_marked_primary():
    picker, tracker = setup()
    tracker.eject(A, T0)
    flags = [(c.node, c.is_primary) for c in picker.candidates(tracker, T0 + 1)]
    assert flags == [(B, True), (BACKUP, False), (LAST, False)]
