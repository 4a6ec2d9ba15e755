"""The partition split: stable when partitions or topics are added, spread evenly, one owner each."""

from __future__ import annotations

from collections import Counter

import pytest

from streamtrain.streams.split import default_workers, owner


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
