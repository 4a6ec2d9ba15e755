"""The partition split: stable when partitions or topics are added, spread evenly, one owner each."""

from __future__ import annotations

from collections import Counter

import pytest

from streamtrain.streams.split import Share, default_workers, owner


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_every_partition_has_one_owner_and_keeps_it_when_more_are_added(count):
    before = [("events", p) for p in range(6)] + [("clicks", p) for p in range(4)]
    after = before + [("events", p) for p in range(6, 12)] + [("new-topic", p) for p in range(5)]
    first = {tp: owner(tp, count) for tp in before}
    assert all(0 <= o < count for o in first.values())
    assert {tp: owner(tp, count) for tp in after if tp in first} == first  # nobody else ever reads a partition


def test_one_topics_partitions_are_spread_round_robin():
    for count in (2, 3, 4):
        for n in (count, 2 * count, 10 * count):
            load = Counter(owner(("events", p), count) for p in range(n))
            assert set(load.values()) == {n // count}, (count, n, load)


def test_default_workers_leave_the_trainer_its_cores():
    assert [default_workers(c) for c in (1, 2, 4, 8, 16, 64)] == [1, 1, 1, 3, 7, 8]


@pytest.mark.parametrize("world, workers", [(2, 1), (2, 2), (3, 2), (1, 3)])
def test_ranks_and_their_workers_read_every_partition_once(world, workers):
    tps = [(t, p) for t in ("a", "orders", "clicks-v2") for p in range(12)]
    readers = [Share(w, workers, r, world) for r in range(world) for w in range(workers)]
    for tp in tps:
        assert sum(s.owns(tp) for s in readers) == 1
        rank = next(s.rank for s in readers if s.owns(tp))
        assert rank == owner(tp, world)  # a rank's partitions do not depend on its worker count
    if world == 1:  # one rank: the workers' split as it was
        assert all(Share(owner(tp, workers), workers).owns(tp) for tp in tps)
    for r in range(world):  # consecutive partitions of a topic go round-robin over the ranks
        assert sum(owner(("orders", p), world) == r for p in range(12)) == 12 // world


def test_a_ranks_partitions_do_not_depend_on_other_ranks_workers():
    tps = [("t", p) for p in range(16)]
    mine = {tp for tp in tps if any(Share(w, 3, 1, 2).owns(tp) for w in range(3))}
    assert mine == {tp for tp in tps if any(Share(w, 1, 1, 2).owns(tp) for w in range(1))}
