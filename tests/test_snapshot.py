"""Unit tests for daemon.snapshot: atomic writes, verified loads, the lock, the writer thread."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from streamtrain.daemon.errors import SnapshotError, SnapshotLockedError
from streamtrain.daemon.snapshot import SnapshotInfo, SnapshotStore
from streamtrain.daemon.snapshot_writer import SnapshotWriter, state_to_host, tensors_finite

REPO = Path(__file__).resolve().parents[1]


def make_state(seed: int = 0) -> dict:
    """A state like the trainer's: model + optimizer state dicts, RNG, plain values."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": torch.get_rng_state(),
        "scaler": {"scale": 65536.0, "growth_tracker": 0, "enabled": False, "note": None},
        "normalizer": (torch.zeros(4), torch.ones(4), 10),
        "history": [1, 2.5, "x", True],
    }


def snap_dirs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != ".lock")


def write_steps(store: SnapshotStore, *steps: int) -> list[SnapshotInfo]:
    return [store.write(make_state(step), {"step": step, "offsets": {"t:0": 10 * step}}) for step in steps]


def assert_nested_equal(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for key in a:
            assert_nested_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_nested_equal(x, y)
    else:
        assert a == b


# --- write, list, load ------------------------------------------------------------------


def test_round_trip_keeps_tensors_meta_and_offsets(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    state = make_state()
    meta = {"step": 7, "offsets": {"events": {"0": 120, "1": 98}}, "model": "mlp", "loss": 0.25}
    info = store.write(state, meta)
    assert info.name.startswith("snap-000000000007-") and info.step == 7
    assert sorted(p.name for p in info.path.iterdir()) == ["MANIFEST.json", "meta.json", "state.pt"]

    loaded = store.load_latest()
    assert loaded is not None
    got_info, got_state = loaded
    assert got_info.name == info.name and got_info.step == 7
    assert got_info.meta["offsets"] == meta["offsets"] and got_info.meta["format_version"] == 1
    assert got_info.created == pytest.approx(info.created)
    assert_nested_equal(state, got_state)
    assert got_state["model"]._metadata == state["model"]._metadata  # load_state_dict's version info
    model = torch.nn.Linear(4, 2)
    model.load_state_dict(got_state["model"])
    store.verify(info)
    store.verify(info.path)


def test_keep_prunes_oldest(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, keep=2)
    write_steps(store, 1, 2, 3, 4)
    assert [i.step for i in store.list()] == [4, 3]
    assert len(snap_dirs(tmp_path)) == 2  # nothing else left: no .tmp-*, no pruned remains


def test_list_is_newest_first_by_step_then_time(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, keep=10)
    first, _low, mid, second = write_steps(store, 5, 1, 3, 3)
    listed = store.list()
    assert [i.step for i in listed] == [5, 3, 3, 1]
    assert listed[1].name == second.name and listed[2].name == mid.name
    assert second.created >= mid.created and second.name != mid.name
    assert store.load_latest()[0].name == first.name


def test_list_keeps_a_snapshot_whose_meta_does_not_parse(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    (info,) = write_steps(store, 4)
    (info.path / "meta.json").write_text("{not json")
    assert [(i.name, i.step, i.meta) for i in store.list()] == [(info.name, 4, {})]
    with pytest.raises(SnapshotError, match=r"(size|sha256) mismatch for meta\.json"):
        store.verify(info)


def test_load_latest_on_empty_or_missing_directory(tmp_path: Path) -> None:
    assert SnapshotStore(tmp_path / "absent").load_latest() is None
    assert SnapshotStore(tmp_path).load_latest() is None
    assert SnapshotStore(tmp_path).list() == []


# --- damaged snapshots: skipped loudly, quarantined, previous one used ------------------


def load_after_damage(tmp_path: Path, caplog: pytest.LogCaptureFixture, damage) -> tuple[SnapshotInfo, SnapshotInfo, str]:
    store = SnapshotStore(tmp_path, keep=5)
    older, newer = write_steps(store, 1, 2)
    damage(newer.path)
    caplog.set_level(logging.INFO, logger="streamtrain.snapshot")
    loaded = store.load_latest()
    assert loaded is not None
    info, state = loaded
    assert info.name == older.name and info.step == 1
    assert_nested_equal(make_state(1), state)
    assert (tmp_path / f"corrupt-{newer.name}").is_dir() and not newer.path.exists()
    assert [i.name for i in store.list()] == [older.name]
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"skipping {newer.name}" in warnings
    assert f"loaded snapshot {older.name} (step 1)" in caplog.text
    return older, newer, warnings


def test_truncated_state_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def truncate(path: Path) -> None:
        f = path / "state.pt"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    _, newer, warnings = load_after_damage(tmp_path, caplog, truncate)
    assert "size mismatch for state.pt" in warnings
    assert f"skipping 1 newer snapshot(s): {newer.name}" in warnings  # the summary


def test_flipped_byte_is_a_sha256_mismatch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def flip(path: Path) -> None:
        f = path / "state.pt"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))

    _, _, warnings = load_after_damage(tmp_path, caplog, flip)
    assert "sha256 mismatch for state.pt" in warnings


def test_missing_manifest_is_an_incomplete_write(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, _, warnings = load_after_damage(tmp_path, caplog, lambda path: (path / "MANIFEST.json").unlink())
    assert "manifest missing (incomplete write)" in warnings


def test_all_damaged_returns_none(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = SnapshotStore(tmp_path)
    (info,) = write_steps(store, 1)
    (info.path / "MANIFEST.json").unlink()
    assert store.load_latest() is None
    assert "no valid snapshot" in caplog.text


def test_cleanup_debris(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = SnapshotStore(tmp_path, keep=1)
    (good,) = write_steps(store, 1)
    tmp = tmp_path / f".tmp-snap-000000000002-{int(time.time() * 1000):013d}-12345"
    tmp.mkdir()
    (tmp / "state.pt").write_bytes(b"half")
    incomplete = tmp_path / f"snap-000000000003-{int(time.time() * 1000):013d}"
    incomplete.mkdir()
    (incomplete / "state.pt").write_bytes(b"no manifest")
    old_corrupt = tmp_path / "corrupt-snap-000000000000-0000000000000"
    old_corrupt.mkdir()

    store.lock()
    try:
        touched = store.cleanup_debris()
    finally:
        store.unlock()
    assert set(touched) == {tmp, incomplete, old_corrupt}  # keep=1: only the newest quarantined one stays
    assert snap_dirs(tmp_path) == sorted([good.name, f"corrupt-{incomplete.name}"])
    assert "manifest missing (incomplete write)" in caplog.text
    assert (tmp_path / f"corrupt-{incomplete.name}" / "QUARANTINED.txt").read_text().startswith("manifest missing")
    assert store.cleanup_debris() == []


# --- a planted pickle must not run ------------------------------------------------------


class Payload:
    """Creates ``marker`` when unpickled, as an attacker's checkpoint would run code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant(directory: Path, step: int, obj: object) -> Path:
    """A snapshot directory with a fully consistent manifest around ``obj``."""
    path = directory / f"snap-{step:012d}-{int(time.time() * 1000):013d}"
    path.mkdir()
    torch.save(obj, path / "state.pt")
    (path / "meta.json").write_text(json.dumps({"step": step, "created": time.time(), "format_version": 1}))
    files = {
        f: {"size": (path / f).stat().st_size, "sha256": hashlib.sha256((path / f).read_bytes()).hexdigest()}
        for f in ("state.pt", "meta.json")
    }
    (path / "MANIFEST.json").write_text(json.dumps({"format_version": 1, "name": path.name, "files": files}))
    return path


def test_malicious_pickle_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The payload is live: an unsafe load really would run it.
    probe = tmp_path / "probe"
    torch.save({"x": Payload(probe)}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe.exists()

    snaps = tmp_path / "snaps"
    store = SnapshotStore(snaps)
    (good,) = write_steps(store, 1)
    marker = tmp_path / "pwned"
    evil = plant(snaps, 2, {"model": Payload(marker)})
    store.verify(evil)  # checksums are right: only weights_only stands in the way

    loaded = store.load_latest()
    assert not marker.exists()
    assert loaded is not None and loaded[0].name == good.name
    assert f"skipping {evil.name}: refused to load state.pt" in caplog.text
    assert "io.open" in caplog.text  # names the global it refused
    assert (snaps / f"corrupt-{evil.name}").is_dir()


# --- the lock ---------------------------------------------------------------------------


@pytest.fixture
def lock_holder(tmp_path: Path) -> Iterator[subprocess.Popen]:
    """A second process that takes the snapshot lock and sleeps; killed -9 at the end."""
    code = (
        "import sys, time\n"
        "from streamtrain.daemon.snapshot import SnapshotStore\n"
        "SnapshotStore(sys.argv[1]).lock()\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready and proc.stdout.readline().strip() == "locked", "lock holder did not start"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()


def test_lock_refused_while_another_process_holds_it(tmp_path: Path, lock_holder: subprocess.Popen) -> None:
    store = SnapshotStore(tmp_path)
    with pytest.raises(SnapshotLockedError, match=rf"in use by another streamtrain process \(pid {lock_holder.pid}\)"):
        store.lock()

    os.kill(lock_holder.pid, signal.SIGKILL)
    lock_holder.wait(timeout=10)
    store.lock()  # the kernel dropped the dead holder's flock
    try:
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    finally:
        store.unlock()


def test_lock_is_exclusive_within_one_process_too(tmp_path: Path) -> None:
    first, second = SnapshotStore(tmp_path / "new" / "dir"), SnapshotStore(tmp_path / "new" / "dir")
    first.lock()
    try:
        first.lock()  # idempotent for its holder
        with pytest.raises(SnapshotLockedError, match=str(os.getpid())):
            second.lock()
    finally:
        first.unlock()
    second.lock()
    second.unlock()


# --- validation: nothing half-done is left ----------------------------------------------


@pytest.mark.parametrize(
    ("meta", "state", "message"),
    [
        ({"step": 1, "when": object()}, {}, r"meta\['when'\]: object is not JSON serializable"),
        ({"step": 1, "offsets": {"t": {0: 5}}}, {}, r"meta\['offsets'\]\['t'\]: key 0 is int; JSON object keys must be str"),
        ({"offsets": {}}, {}, r"meta\['step'\] must be an int"),
        ({"step": True}, {}, r"meta\['step'\] must be an int"),
        ({"step": 1}, {"rng": {"numpy": np.zeros(3)}}, r"state\['rng'\]\['numpy'\]: numpy.ndarray cannot be loaded with weights_only"),
    ],
)
def test_invalid_input_raises_before_touching_disk(tmp_path: Path, meta: dict, state: dict, message: str) -> None:
    with pytest.raises(SnapshotError, match=message):
        SnapshotStore(tmp_path).write(state, meta)
    assert snap_dirs(tmp_path) == []


def test_failed_write_leaves_no_debris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SnapshotStore(tmp_path)
    write_steps(store, 1)

    def broken_save(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(SnapshotError, match="No space left on device") as raised:
        store.write(make_state(), {"step": 2})
    assert isinstance(raised.value.__cause__, OSError)
    assert [name[:17] for name in snap_dirs(tmp_path)] == ["snap-000000000001"]


# --- the writer thread ------------------------------------------------------------------


class GatedStore(SnapshotStore):
    """Holds writes of the steps in ``hold`` until ``gate`` is set; records the order."""

    def __init__(self, directory: Path, hold: set[int]) -> None:
        super().__init__(directory)
        self.gate = threading.Event()
        self.hold = hold
        self.written: list[int] = []

    def write(self, state: dict, meta: dict) -> SnapshotInfo:
        if meta.get("step") in self.hold:
            assert self.gate.wait(10), "test gate never opened"
        info = super().write(state, meta)
        self.written.append(info.step)
        return info


def test_submit_refuses_while_busy_and_reports_durable(tmp_path: Path) -> None:
    store = GatedStore(tmp_path, hold={1})
    durable: list[tuple[SnapshotInfo, float]] = []
    writer = SnapshotWriter(store, on_durable=lambda info, seconds: durable.append((info, seconds)))
    assert writer.submit(make_state(), {"step": 1})
    assert writer.busy()
    assert not writer.submit(make_state(), {"step": 2})
    assert not writer.wait(timeout=0.05)
    store.gate.set()
    assert writer.wait(timeout=10)
    assert not writer.busy()
    assert store.written == [1]
    ((info, seconds),) = durable
    assert info.step == 1 and seconds >= 0 and (info.path / "MANIFEST.json").is_file()
    writer.close(timeout=10)
    with pytest.raises(SnapshotError, match="closed"):
        writer.submit(make_state(), {"step": 3})


def test_write_now_waits_for_the_write_in_flight(tmp_path: Path) -> None:
    store = GatedStore(tmp_path, hold={1})
    durable: list[int] = []
    writer = SnapshotWriter(store, on_durable=lambda info, seconds: durable.append(info.step))
    assert writer.submit(make_state(1), {"step": 1})
    result: list[SnapshotInfo] = []
    caller = threading.Thread(target=lambda: result.append(writer.write_now(make_state(2), {"step": 2})))
    caller.start()
    caller.join(timeout=0.3)
    assert caller.is_alive() and store.written == []  # step 2 is not held: only the wait stops it
    store.gate.set()
    caller.join(timeout=10)
    assert not caller.is_alive()
    assert store.written == [1, 2] and durable == [1, 2] and result[0].step == 2
    writer.close(timeout=10)


def test_background_failure_goes_to_on_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    errors: list[BaseException] = []
    writer = SnapshotWriter(SnapshotStore(tmp_path), on_error=errors.append)
    assert writer.submit({}, {"step": 1, "bad": {1, 2}})
    assert writer.wait(timeout=10)
    assert len(errors) == 1 and isinstance(errors[0], SnapshotError)
    assert any(r.levelno == logging.ERROR and "background snapshot write failed" in r.getMessage() for r in caplog.records)
    assert writer.submit({}, {"step": 2})  # the writer is still usable
    assert writer.wait(timeout=10)
    writer.close(timeout=10)


# --- helpers for the trainer ------------------------------------------------------------


def test_state_to_host_copies() -> None:
    state = make_state()
    weight = torch.nn.Parameter(torch.ones(3))
    state["extra"] = [weight, (torch.arange(3), "tag")]
    copied = state_to_host(state)
    assert_nested_equal(state, copied)
    assert copied["model"]._metadata == state["model"]._metadata
    with torch.no_grad():
        state["model"]["weight"].add_(1.0)
        weight.mul_(5)
        state["extra"][1][0].fill_(-1)
    assert not torch.equal(copied["model"]["weight"], state["model"]["weight"])
    assert torch.equal(copied["extra"][0], torch.ones(3)) and not copied["extra"][0].requires_grad
    assert torch.equal(copied["extra"][1][0], torch.arange(3)) and copied["extra"][1][1] == "tag"


def test_tensors_finite() -> None:
    state = make_state()
    assert tensors_finite(state)
    assert tensors_finite({"ints": torch.arange(3), "empty": torch.empty(0), "x": float("inf")})
    assert not tensors_finite({"a": [1, (torch.tensor([1.0, float("nan")]),)]})
    assert not tensors_finite({"a": {"b": torch.tensor([float("-inf")], dtype=torch.float16)}})
