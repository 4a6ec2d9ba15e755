"""Unit tests for streams.shared_ring: the two sides of the ring shared with the ingest process.

Both sides run in this process here, over the same real pipes and shared mapping the
daemon uses across processes (the integration tests cover the process itself).
"""

from __future__ import annotations

import math
import os
import threading
import time

import pytest
import torch

from streamtrain.streams.errors import ConfigError, DeadLetterError, StreamtrainError
from streamtrain.streams.shared_ring import ChildRing, SharedRing, describe_error, rebuild_error, send_frame
from streamtrain.streams.slots import RingClosed

WAIT = 5.0


def pair(slots: int = 3, batch_size: int = 4, width: int = 2) -> tuple[SharedRing, ChildRing]:
    parent = SharedRing(slots, batch_size, width)
    ann_r, ann_w = os.pipe()
    give_r, give_w = os.pipe()
    parent.connect(ann_r, give_w)
    child = ChildRing(os.dup(parent.fd), slots, batch_size, width, ann_w, give_r)
    return parent, child


def fill(child: ChildRing, value: float, n: int, positions: dict | None = None, ts: float = math.nan) -> int:
    slot = child.acquire(timeout=0)
    assert slot is not None
    child.x_np[slot, :n] = value
    child.y_np[slot, :n] = -value
    child.publish(slot, n, positions or {}, ts)
    return slot


def test_batches_written_by_the_child_are_read_by_the_trainer_without_a_copy():
    parent, child = pair()
    fill(child, 1.5, 3, {("t", 0): (10, 0)}, ts=99.0)
    batch = parent.get(WAIT)
    assert batch is not None and len(batch) == 3
    assert torch.equal(batch.x, torch.full((3, 2), 1.5)) and torch.equal(batch.y, torch.full((3,), -1.5))
    assert batch.positions == {("t", 0): (10, 0)} and batch.oldest_timestamp == 99.0
    # the batch is a view of the shared mapping: the child's next write would show through
    child.x_np[batch.slot, 0, 0] = 7.0
    assert batch.x[0, 0].item() == 7.0


def test_slots_come_back_to_the_child_only_when_released():
    parent, child = pair(slots=2)
    fill(child, 1.0, 1)
    fill(child, 2.0, 1)
    assert child.acquire(timeout=0.05) is None  # both slots are out
    assert not child.wait_free(0.05)
    first = parent.get(WAIT)
    assert child.acquire(timeout=0.05) is None  # taken but not released yet
    parent.release(first.slot)
    assert child.wait_free(WAIT)
    assert child.acquire(timeout=0) == 0  # slots cycle in order
    second = parent.get(WAIT)
    assert second.x[0, 0].item() == 2.0


def test_status_messages_reach_the_callback_and_fill_counts_ready_slots():
    parent, child = pair()
    seen = []
    parent.on_status = seen.append
    child.send(("status", {"consumed": 5}))
    fill(child, 1.0, 1)
    fill(child, 1.0, 1)
    parent.pump(WAIT)
    assert seen == [{"consumed": 5}]
    assert parent.fill() == 2


def test_an_error_in_the_child_is_raised_as_the_same_class_on_the_trainer_side():
    parent, child = pair()
    fill(child, 1.0, 1)
    child.close(DeadLetterError("dead-letter topic dlq unwritable: broker down"))
    assert parent.get(WAIT) is not None  # what was published before the error is still trained
    with pytest.raises(RingClosed):
        parent.get(WAIT)
    assert isinstance(parent.error, DeadLetterError) and "broker down" in str(parent.error)


def test_the_child_going_away_closes_the_ring_with_what_on_end_reports():
    parent, child = pair()
    parent.on_end = lambda: StreamtrainError("ingest process exited with code -9")
    os.close(child._announce)
    with pytest.raises(RingClosed):
        parent.get(WAIT)
    assert "code -9" in str(parent.error)


def test_the_trainer_detaching_makes_the_child_stop_and_closes_the_shared_file():
    parent, child = pair(slots=1)
    fill(child, 1.0, 1)
    batch = parent.get(WAIT)
    shared_fd = parent.fd
    parent.detach()
    with pytest.raises(OSError):
        os.fstat(shared_fd)  # no file descriptor left behind per stream restart
    assert batch.x[0, 0].item() == 1.0  # a batch handed out stays readable: the mapping remains
    with pytest.raises(RingClosed):
        child.acquire(timeout=WAIT)
    child.send(("status", {}))  # writing to a trainer that is gone does not raise


def test_errors_cross_the_pipe_by_description():
    config = rebuild_error(describe_error(ConfigError(["kafka.settings: no such property"])))
    assert isinstance(config, ConfigError) and config.problems == ["kafka.settings: no such property"]
    other = rebuild_error(describe_error(ZeroDivisionError("boom")))
    assert type(other) is StreamtrainError and "ZeroDivisionError: boom" in str(other)


def free_slots(child: ChildRing) -> int:
    """Acquire every slot the trainer has given back; how many there were."""
    n = 0
    while child.acquire(timeout=0.05) is not None:
        n += 1
    return n


def test_slots_are_given_back_a_few_at_a_time_and_all_before_the_trainer_waits():
    parent, child = pair(slots=8)
    assert parent.give_back_every == 2
    for v in range(8):
        fill(child, float(v), 1)
    parent.release(parent.get(WAIT).slot)
    assert free_slots(child) == 0  # one released slot is not written back yet
    parent.release(parent.get(WAIT).slot)
    assert free_slots(child) == 2  # the second one sends both
    for _ in range(5):
        parent.release(parent.get(WAIT).slot)
    assert free_slots(child) == 4  # 5 released, 4 given back
    assert parent.get(WAIT).x[0, 0].item() == 7.0  # the last ready batch
    assert parent.get(0.05) is None  # nothing ready: what was owed went back before waiting
    assert free_slots(child) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_shared_slots_are_page_locked_for_asynchronous_copies_on_cuda():
    parent = SharedRing(2, 4, 3, pin_memory=True)
    assert parent.x.is_pinned() and parent.y.is_pinned()
    parent.x_np[0, :2] = 2.0
    on_gpu = parent.x[0, :2].to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.cpu(), torch.full((2, 3), 2.0))


def test_every_waiting_announcement_is_taken_in_one_pump_in_order():
    parent, child = pair(slots=32)
    for v in range(32):
        fill(child, float(v), 1, {("t", 0): (v + 1, 0)})
    parent.pump(0)
    assert parent.fill() == 32
    got = [parent.get(0) for _ in range(32)]
    assert [b.x[0, 0].item() for b in got] == [float(v) for v in range(32)]
    assert [b.positions[("t", 0)] for b in got] == [(v + 1, 0) for v in range(32)]


def test_a_frame_that_arrives_in_pieces_is_read_once_whole():
    parent, child = pair()
    seen = []
    parent.on_status = seen.append
    r, w = os.pipe()
    send_frame(w, ("status", {"big": "x" * 1000}))
    whole = os.read(r, 1 << 16)
    for fd in (r, w):
        os.close(fd)
    os.write(child._announce, whole[:3])  # not even the whole length prefix
    parent.pump(0)
    os.write(child._announce, whole[3:500])
    parent.pump(0)
    assert seen == []
    os.write(child._announce, whole[500:])
    parent.pump(WAIT)
    assert seen == [{"big": "x" * 1000}]


def test_a_status_larger_than_the_pipe_gets_through():
    parent, child = pair()
    seen = []
    parent.on_status = seen.append
    big = {"hwm": [["t", p, p * 7] for p in range(20_000)]}  # well over a pipe's 64 KiB
    writer = threading.Thread(target=child.send, args=(("status", big),))
    writer.start()
    deadline = time.monotonic() + WAIT
    while not seen and time.monotonic() < deadline:
        parent.pump(0.05)
    writer.join(WAIT)
    assert seen == [big]
