"""The last line of defence (streams/quarantine.py): a record that crashes the decoder is rejected, never fatal.

In-process: a decoder raising out of ``decode()`` is bisected down to the records that
raise alone.  Across a crash of the process: the marker written before each decode names
the batch; the next start probes it in a child process, or decodes it one record at a time,
or rejects the one record that was being decoded alone.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from streamtrain.streams.config import DataConfig, parse
from streamtrain.streams.decode import LabelRule, make_decoder
from streamtrain.streams.failpoints import ENV
from streamtrain.streams.quarantine import DecoderCrashError, Quarantine, _read_marker, keep_crashed_marker, marker_path
from streamtrain.streams.split import EVERYTHING, Share

DATA = parse(DataConfig, {"format": "json", "features": ["a", "b"], "label": "y"}, "data")
RULE = LabelRule()
TPS = [("t", 0), ("t", 1)]


def good(i: int) -> bytes:
    return json.dumps({"a": i, "b": -i, "y": i % 2}).encode()


def batch(n: int, poison: dict[int, bytes] | None = None, first_offset: int = 100):
    """n records over partitions 0/1 (even/odd), offsets counting up per partition; some replaced."""
    values = [good(i) for i in range(n)]
    for i, v in (poison or {}).items():
        values[i] = v
    part = np.asarray([i % 2 for i in range(n)], np.int32)
    offset = np.asarray([first_offset + i // 2 for i in range(n)], np.int64)
    return values, part, offset


def where(i: int) -> str:
    return f"record#{i}"


def plain_decode(values):
    return make_decoder(DATA, RULE).decode(values)


class Raising:
    """A decoder with a bug: a batch holding a record with ``BUG`` raises out of decode()."""

    width = 2

    def __init__(self) -> None:
        self.inner = make_decoder(DATA, RULE)
        self.calls = 0

    def decode(self, values):
        self.calls += 1
        if any(v is not None and b"BUG" in v for v in values):
            raise IndexError("index out of bounds")
        return self.inner.decode(values)


# ----------------------------------------------------------------------------- in-process bisection


@pytest.mark.parametrize("bad", [[0], [37], [3, 4, 99], list(range(0, 100, 9))])
def test_records_raising_out_of_the_decoder_are_rejected_and_the_rest_decodes_as_without_them(bad):
    poison = {i: b'{"a": 1, "b": 2, "y": 1, "BUG": 1}' for i in bad}
    values, part, offset = batch(100, poison)
    out = Quarantine(Raising(), DATA, RULE).decode(values, part, offset, TPS, where)
    crashes = [r for r in out.rejects if r.reason == "decoder_crash"]
    assert [r.index for r in crashes] == bad
    assert all(r.exception == "IndexError" and "index out of bounds" in r.error for r in crashes)
    expected = plain_decode([None if i in poison else v for i, v in enumerate(values)])
    np.testing.assert_array_equal(out.x, expected.x)
    np.testing.assert_array_equal(out.msg_index, expected.msg_index)
    assert out.msg_index.tolist() == [i for i in range(100) if i not in poison]
    assert out.nbytes == sum(map(len, values))


def test_other_rejects_keep_their_reasons_next_to_a_crash():
    values, part, offset = batch(20, {2: b"{not json", 5: b'{"BUG": 1}', 9: b'{"a": 1, "b": 2}'})
    out = Quarantine(Raising(), DATA, RULE).decode(values, part, offset, TPS, where)
    assert [(r.index, r.reason) for r in out.rejects] == [(2, "undecodable"), (5, "decoder_crash"), (9, "missing_label")]


def test_policy_stop_raises_naming_the_record():
    data = parse(DataConfig, {"format": "json", "features": ["a", "b"], "label": "y", "on_decoder_crash": "stop"}, "data")
    values, part, offset = batch(10, {4: b'{"BUG": 1}'})
    with pytest.raises(DecoderCrashError, match=r"record#4 crashed the decoder .*IndexError.*on_decoder_crash=stop"):
        Quarantine(Raising(), data, RULE).decode(values, part, offset, TPS, where)


def test_a_clean_batch_costs_one_decode_call():
    dec = Raising()
    values, part, offset = batch(50)
    out = Quarantine(dec, DATA, RULE).decode(values, part, offset, TPS, where)
    assert dec.calls == 1 and len(out.y) == 50 and out.rejects == []


def test_the_fail_point_raises_out_of_decode(monkeypatch):
    monkeypatch.setenv(ENV, "decode=raise:POISON")
    dec = make_decoder(DATA, RULE)
    with pytest.raises(RuntimeError, match="fail point"):
        dec.decode([good(1), b'{"POISON": 1}'])
    values, part, offset = batch(8, {6: b'{"POISON": 1}'})
    out = Quarantine(dec, DATA, RULE).decode(values, part, offset, TPS, where)
    assert [(r.index, r.reason, r.exception) for r in out.rejects] == [(6, "decoder_crash", "RuntimeError")]


# ----------------------------------------------------------------------------- across a crash of the process


class MarkerReader:
    """A decoder that reads its loop's marker file whenever it decodes: what a crash at that moment would leave."""

    width = 2

    def __init__(self, path, never: bytes | None = None) -> None:
        self.path = path
        self.never = never
        self.seen: list[tuple[str, list]] = []
        self.inner = make_decoder(DATA, RULE)

    def decode(self, values):
        entries = _read_marker(self.path.read_bytes())
        self.seen.append((entries[0][2] if entries else "", [(tp, o) for tp, o, _m in entries]))
        assert self.never is None or self.never not in values, "a convicted record was decoded again"
        return self.inner.decode(values)


def crash_with_marker(tmp_path, mode: str, pairs: list[tuple[tuple[str, int], int]], share: Share = EVERYTHING) -> None:
    """What a crashed ingest leaves: its marker naming ``pairs`` under ``mode``, kept by the parent as ``*.crashed``."""
    tps = sorted({tp for tp, _ in pairs})
    head = {"mode": mode, "tps": [list(tp) for tp in tps], "n": len(pairs), "unresolved": []}
    part = np.asarray([tps.index(tp) for tp, _ in pairs], np.int32)
    offset = np.asarray([o for _, o in pairs], np.int64)
    marker_path(tmp_path, share).write_bytes(json.dumps(head).encode() + b"\n" + part.tobytes() + offset.tobytes())
    keep_crashed_marker(tmp_path, share, "signal SIGSEGV")


def test_the_marker_names_exactly_the_batch_being_decoded_and_is_empty_between(tmp_path):
    dec = MarkerReader(marker_path(tmp_path))
    q = Quarantine(dec, DATA, RULE, tmp_path)
    values, part, offset = batch(6)
    q.decode(values, part, offset, TPS, where)
    assert dec.seen == [("batch", [(TPS[i % 2], 100 + i // 2) for i in range(6)])]
    assert _read_marker(marker_path(tmp_path).read_bytes()) == [], "cleared after the decode"
    keep_crashed_marker(tmp_path, Share(), "exit 1")  # not decoding when it ended: nothing kept
    assert not list(tmp_path.glob("*.crashed"))


def test_a_record_that_kills_the_process_is_found_in_a_child_and_rejected(tmp_path, monkeypatch):
    values, part, offset = batch(40, {13: b'{"a": 1, "b": 2, "y": 0, "SEGV": 1}'})
    crash_with_marker(tmp_path, "batch", [(TPS[int(p)], int(o)) for p, o in zip(part, offset)])
    dec = MarkerReader(marker_path(tmp_path))
    q = Quarantine(dec, DATA, RULE, tmp_path)  # this process's decoder has no fail point ...
    monkeypatch.setenv(ENV, "decode=segv:SEGV")  # ... the probing children's do
    out = q.decode(values, part, offset, TPS, where)
    assert [(r.index, r.reason) for r in out.rejects] == [(13, "decoder_crash")]
    assert "SIGSEGV" in out.rejects[0].error
    assert out.msg_index.tolist() == [i for i in range(40) if i != 13]
    assert dec.seen[0][0] == "probed"  # decoded in-process under a marker saying the child did not crash
    assert not list(tmp_path.glob("*.crashed")), "the crashed marker was taken over"
    dec.seen.clear()
    q.decode(*batch(4, first_offset=200), TPS, where)  # the suspects are settled: the next batch is an ordinary one
    assert dec.seen[0][0] == "batch"


def test_a_crash_a_child_does_not_reproduce_is_narrowed_to_one_record_per_marker(tmp_path):
    values, part, offset = batch(5)
    crash_with_marker(tmp_path, "probed", [(TPS[int(p)], int(o)) for p, o in zip(part, offset)])
    dec = MarkerReader(marker_path(tmp_path))
    out = Quarantine(dec, DATA, RULE, tmp_path).decode(values, part, offset, TPS, where)
    assert out.msg_index.tolist() == [0, 1, 2, 3, 4] and out.rejects == []
    np.testing.assert_array_equal(out.x, plain_decode(values).x)
    assert dec.seen == [("alone", [(TPS[i % 2], 100 + i // 2)]) for i in range(5)]


def test_the_record_that_was_being_decoded_alone_is_rejected_without_being_decoded(tmp_path):
    values, part, offset = batch(6)
    crash_with_marker(tmp_path, "alone", [(TPS[int(part[3])], int(offset[3]))])
    dec = MarkerReader(marker_path(tmp_path), never=values[3])
    out = Quarantine(dec, DATA, RULE, tmp_path).decode(values, part, offset, TPS, where)
    assert [(r.index, r.reason) for r in out.rejects] == [(3, "decoder_crash")]
    assert out.msg_index.tolist() == [0, 1, 2, 4, 5]


def test_a_kill_of_the_group_leaves_no_suspects_but_thread_mode_trusts_its_own_marker(tmp_path):
    values, part, offset = batch(4)
    path = marker_path(tmp_path)
    head = {"mode": "batch", "tps": [list(tp) for tp in TPS], "n": 4, "unresolved": []}
    blob = json.dumps(head).encode() + b"\n" + part.tobytes() + offset.tobytes()
    path.write_bytes(blob)  # the ingest was decoding when everything was killed: nobody renamed it
    dec = MarkerReader(path)
    Quarantine(dec, DATA, RULE, tmp_path).decode(values, part, offset, TPS, where)
    assert dec.seen[0][0] == "batch", "process mode: a marker nobody kept is no crash"
    path.write_bytes(blob)
    dec = MarkerReader(path)
    Quarantine(dec, DATA, RULE, tmp_path, trust_own_marker=True).decode(values, part, offset, TPS, where)
    assert dec.seen[0][0] == "probed", "thread mode: a crash would have taken the parent too, so the marker counts"


def test_suspects_of_partitions_another_reader_owns_are_left_to_it(tmp_path):
    theirs = next(Share(worker=w, workers=2) for w in (0, 1) if not Share(worker=w, workers=2).owns(("t", 0)))
    crash_with_marker(tmp_path, "alone", [(("t", 0), 100)])
    mine = Share(worker=1 - theirs.worker, workers=2)
    q = Quarantine(make_decoder(DATA, RULE), DATA, RULE, tmp_path, mine)
    assert q._suspects == {("t", 0): {100: "alone"}}
    assert not list(tmp_path.glob("*.crashed"))
    crash_with_marker(tmp_path, "alone", [(("t", 0), 100)], mine)
    q = Quarantine(make_decoder(DATA, RULE), DATA, RULE, tmp_path, theirs)
    assert q._suspects == {} and list(tmp_path.glob("*.crashed")), "not this reader's partition: the marker stays for its owner"


def test_suspects_read_past_are_dropped_and_unresolved_ones_carried_in_the_marker(tmp_path):
    crash_with_marker(tmp_path, "alone", [(("t", 0), 5), (("t", 1), 500)])
    dec = MarkerReader(marker_path(tmp_path))
    q = Quarantine(dec, DATA, RULE, tmp_path)
    q.decode(*batch(4, first_offset=100), TPS, where)  # partition 0 is past 5; partition 1 not yet at 500
    assert q._suspects == {("t", 1): {500: "alone"}}
    assert (("t", 1), 500) in dec.seen[0][1], "an unresolved suspect survives another crash in the marker"


def test_an_unreadable_marker_is_ignored_loudly(tmp_path, caplog):
    path = marker_path(tmp_path).with_suffix(".crashed")
    path.write_bytes(b'{"mode": "batch", "tps": [["t", 0]], "n": 1000}\n\x00\x01')
    q = Quarantine(make_decoder(DATA, RULE), DATA, RULE, tmp_path)
    assert q._suspects == {} and "unreadable decoder-crash marker" in caplog.text
