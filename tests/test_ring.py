"""Unit tests for streams.ring: slot hand-over between one producer and one consumer."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from streamtrain.streams.ring import Batch, Ring, RingClosed

WAIT = 5.0  # bound on every wait that should end at once


def fill(ring: Ring, value: float, n: int, positions: dict | None = None, ts: float = math.nan) -> int:
    """Acquire a slot, write ``n`` rows of ``value`` (label ``-value``), publish it; returns the slot."""
    slot = ring.acquire(timeout=0)
    assert slot is not None
    ring.x_np[slot, :n] = value
    ring.y_np[slot, :n] = -value
    ring.publish(slot, n, positions or {}, ts)
    return slot


def in_thread(fn) -> tuple[threading.Thread, list]:
    """Run ``fn`` in a thread; the list receives its result or exception."""
    out: list = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_batches_come_out_in_order_with_their_contents_and_positions():
    ring = Ring(slots=3, batch_size=4, width=2)
    fill(ring, 1.0, 4, {("t", 0): (10, 0)}, ts=100.0)
    fill(ring, 2.0, 1, {("t", 1): (5, 3)})
    assert ring.fill() == 2 and ring.free() == 1
    first, second = ring.get(0), ring.get(0)
    assert first.slot != second.slot
    assert len(first) == 4 and first.x.shape == (4, 2) and first.y.shape == (4,)
    assert torch.equal(first.x, torch.full((4, 2), 1.0)) and torch.equal(first.y, torch.full((4,), -1.0))
    assert first.positions == {("t", 0): (10, 0)} and first.oldest_timestamp == 100.0
    assert len(second) == 1 and second.x.tolist() == [[2.0, 2.0]] and second.positions == {("t", 1): (5, 3)}
    assert math.isnan(second.oldest_timestamp)
    assert ring.fill() == 0


def test_batch_tensors_are_views_of_the_slot():
    ring = Ring(slots=2, batch_size=3, width=1)
    slot = fill(ring, 7.0, 2)
    batch = ring.get(0)
    assert batch.x.dtype == torch.float32 and batch.y.dtype == torch.float32
    ring.x_np[slot, 0, 0] = 42.0  # the producer reuses the slot's memory once it is released
    assert batch.x[0, 0].item() == 42.0
    assert ring.nbytes == 2 * 3 * 1 * 4 + 2 * 3 * 4


def test_empty_batch_carries_only_positions():
    ring = Ring(slots=2, batch_size=4, width=2)
    fill(ring, 0.0, 0, {("t", 0): (3, 0)})
    batch = ring.get(0)
    assert len(batch) == 0 and batch.x.shape == (0, 2) and batch.positions == {("t", 0): (3, 0)}


def test_acquire_returns_none_when_full_and_a_slot_after_release():
    ring = Ring(slots=2, batch_size=1, width=1)
    fill(ring, 1.0, 1)
    fill(ring, 2.0, 1)
    assert ring.acquire(timeout=0) is None
    assert ring.acquire(timeout=0.05) is None
    batch = ring.get(0)
    ring.release(batch.slot)
    assert ring.acquire(timeout=0) == batch.slot


def test_blocked_acquire_wakes_on_release():
    ring = Ring(slots=2, batch_size=1, width=1)
    fill(ring, 1.0, 1)
    fill(ring, 2.0, 1)
    t, out = in_thread(lambda: ring.acquire(timeout=WAIT))
    batch = ring.get(0)
    ring.release(batch.slot)
    t.join(WAIT)
    assert out == [batch.slot]


def test_wait_free():
    ring = Ring(slots=2, batch_size=1, width=1)
    assert ring.wait_free(0)
    fill(ring, 1.0, 1)
    fill(ring, 2.0, 1)
    assert not ring.wait_free(0.05)
    ring.release(ring.get(0).slot)
    assert ring.wait_free(0)


def test_get_times_out_with_none():
    ring = Ring(slots=2, batch_size=1, width=1)
    assert ring.get(0) is None
    assert ring.get(0.05) is None


def test_blocked_get_wakes_on_publish():
    ring = Ring(slots=2, batch_size=1, width=1)
    t, out = in_thread(lambda: ring.get(WAIT))
    fill(ring, 3.0, 1)
    t.join(WAIT)
    assert len(out) == 1 and isinstance(out[0], Batch) and out[0].x.item() == 3.0


def test_close_wakes_a_blocked_get():
    ring = Ring(slots=2, batch_size=1, width=1)
    t, out = in_thread(lambda: ring.get(None))  # would wait forever without close
    ring.close()
    t.join(WAIT)
    assert not t.is_alive()
    assert len(out) == 1 and isinstance(out[0], RingClosed)
    assert ring.error is None


def test_close_with_error_keeps_the_first_error():
    ring = Ring(slots=2, batch_size=1, width=1)
    boom = ValueError("dead-letter topic unwritable")
    ring.close(boom)
    ring.close(RuntimeError("later"))
    ring.close()
    assert ring.error is boom
    with pytest.raises(RingClosed):
        ring.get(0)


def test_close_wakes_a_blocked_acquire():
    ring = Ring(slots=2, batch_size=1, width=1)
    fill(ring, 1.0, 1)
    fill(ring, 2.0, 1)
    t, out = in_thread(lambda: ring.acquire(timeout=WAIT * 10))
    ring.close()
    t.join(WAIT)
    assert len(out) == 1 and isinstance(out[0], RingClosed)
    assert ring.wait_free(0)  # a closed ring never blocks the producer
    with pytest.raises(RingClosed):
        ring.acquire(timeout=0)


def test_batches_published_before_close_can_still_be_taken():
    ring = Ring(slots=3, batch_size=2, width=1)
    fill(ring, 1.0, 2)
    fill(ring, 2.0, 1)
    ring.close(RuntimeError("stopped"))
    assert ring.get(0).x[0].item() == 1.0
    assert ring.get(None).x[0].item() == 2.0
    with pytest.raises(RingClosed):
        ring.get(None)


def test_slots_are_reused_round_robin_under_a_producer_thread():
    """A producer thread and this consumer move 200 batches through 3 slots, each seen once, in order."""
    ring = Ring(slots=3, batch_size=5, width=2)
    n = 200

    def produce() -> int:
        for i in range(n):
            slot = ring.acquire(timeout=WAIT)
            assert slot is not None
            ring.x_np[slot] = i
            ring.y_np[slot] = i
            ring.publish(slot, 5, {("t", 0): (i + 1, 0)}, math.nan)
        return n

    t, out = in_thread(produce)
    seen = []
    for _ in range(n):
        batch = ring.get(WAIT)
        assert batch is not None and batch.positions == {("t", 0): (len(seen) + 1, 0)}
        assert np.all(batch.x.numpy() == len(seen)) and np.all(batch.y.numpy() == len(seen))
        seen.append(batch.slot)
        ring.release(batch.slot)
    t.join(WAIT)
    assert out == [n] and len(seen) == n and set(seen) == {0, 1, 2}


def test_unpinned_ring_on_cpu():
    ring = Ring(slots=2, batch_size=2, width=1, pin_memory=False)
    assert not ring.x.is_pinned() and not ring.y.is_pinned()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_ring_and_batch_pin_memory():
    ring = Ring(slots=2, batch_size=2, width=1, pin_memory=True)
    assert ring.x.is_pinned() and ring.y.is_pinned()
    fill(ring, 1.0, 2)
    batch = ring.get(0)
    assert batch.pin_memory() is batch  # already pinned: no copy
    plain = Batch(torch.ones(2, 1), torch.zeros(2), {("t", 0): (1, 0)}, 5.0)
    pinned = plain.pin_memory()
    assert pinned.x.is_pinned() and pinned.y.is_pinned()
    assert torch.equal(pinned.x, plain.x) and pinned.positions == plain.positions and pinned.oldest_timestamp == 5.0


class _Copy:
    """Stands for the CUDA event of an asynchronous copy out of a slot: done when told, or when waited for."""

    def __init__(self) -> None:
        self.done = False
        self.waited = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = self.done = True


class _NoIngest:
    def close(self) -> None:
        pass


def dataset_over(ring: Ring):
    """A dataset reading ``ring`` with no Kafka behind it (the ingest is a stand-in)."""
    from streamtrain.streams.dataset import KafkaIterableDataset

    ds = KafkaIterableDataset.from_dict({"kafka": {"topics": ["t"]}, "data": {"format": "raw", "num_features": 2}})
    ds.ring, ds.ingest = ring, _NoIngest()
    return ds


def test_a_slot_being_copied_goes_back_once_the_copy_is_done_and_in_order():
    ring = Ring(3, 4, 2)
    ds = dataset_over(ring)
    fill(ring, 1.0, 4)
    fill(ring, 2.0, 4)
    b1 = ds.next_batch(timeout=WAIT)
    b1.copy_done = c1 = _Copy()
    b2 = ds.next_batch(timeout=WAIT)  # a batch is ready: taken without waiting for b1's copy
    assert b2.x[0, 0] == 2.0 and ring.free() == 1 and not c1.waited  # b1's slot is held
    b2.copy_done = c2 = _Copy()
    fill(ring, 3.0, 4)
    c1.done = True
    b3 = ds.next_batch(timeout=WAIT)  # b1's copy is done now: its slot goes back, b2's stays
    assert b3.x[0, 0] == 3.0 and ring.free() == 1 and b1.slot in ring._free and not c2.waited
    assert ds.next_batch(timeout=0.05) is None  # nothing ready: b2's copy is waited for, then b2's and b3's slots go back
    assert c2.waited and ring.free() == 3 and list(ring._free)[-2:] == [b2.slot, b3.slot]


def test_closing_the_dataset_waits_for_copies_out_of_its_slots():
    ring = Ring(2, 4, 2)
    ds = dataset_over(ring)
    fill(ring, 1.0, 4)
    fill(ring, 2.0, 4)
    ds.next_batch(timeout=WAIT).copy_done = c = _Copy()
    ds.next_batch(timeout=WAIT)
    assert ring.free() == 0
    ds.close()
    assert c.waited and ring.free() == 1


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
def test_cuda_a_slot_goes_back_only_after_its_copy_to_the_device():
    """The learner's non-blocking copy out of a pinned slot: the slot is held while the copy is queued behind work."""
    from streamtrain.config.schema import config_from_dict
    from streamtrain.daemon.step import Learner

    ring = Ring(2, 1024, 2, pin_memory=True)
    ds = dataset_over(ring)
    cfg = config_from_dict({"kafka": {"topics": ["t"]}, "data": {"format": "raw", "num_features": 2}, "trainer": {"device": "cuda"}})
    learner = Learner(cfg)
    fill(ring, 1.0, 1024)
    fill(ring, 2.0, 1024)
    b1 = ds.next_batch(timeout=WAIT)
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU time queued before the step's copies
    learner.step(b1)  # returns only after the device (its one sync): copy and step done
    assert b1.copy_done.query()
    b1.copy_done = torch.cuda.Event()  # a copy still queued: behind another second of GPU time
    torch.cuda._sleep(2_000_000_000)
    b1.x.to("cuda", non_blocking=True)
    b1.copy_done.record()
    ds.next_batch(timeout=WAIT)  # b2 was ready: b1's slot is held, not waited for
    assert ring.free() == 0 and not b1.copy_done.query()
    assert ds.next_batch(timeout=0.05) is None  # nothing ready: the copy is waited for, the slots go back
    assert b1.copy_done.query() and ring.free() == 2
