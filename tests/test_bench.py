"""The benchmarks run (a tiny size, figures not checked: a benchmark is not a test)."""

from __future__ import annotations

import importlib.util
import os
import re

import pytest
import torch

from bench import calls, fetchwait, fields, frames, ingest, learning, neighbour, pipeline, serve, step
from bench.common import MODELS, daemon_config, fill_topic, records, snapshot_dir, unique
from bench.loops import compute_only, end_to_end

pytestmark = pytest.mark.integration


def test_pipeline_quick_prints_its_table(bootstrap, capsys):
    assert pipeline.main(["--quick", "--formats", "json-8", "--models", "mlp", "--samples", "20000", "--bootstrap", bootstrap]) == 0
    out = capsys.readouterr().out
    assert "| json-8 | mlp   |" in out
    assert "E, side by side" in out and "E, strict" in out


def test_ingest_prints_a_row_per_format_and_bad_fraction(bootstrap, capsys):
    args = ["--quick", "--formats", "csv", "--bad", "0,0.05", "--workers", "1,2", "--samples", "20000", "--bootstrap", bootstrap]
    assert ingest.main(args) == 0
    out = capsys.readouterr().out
    for bad in ("0 %", "5 %"):
        for workers in (1, 2):
            assert re.search(rf"\| csv +\| {bad} +\| {workers} ", out), out


def test_ingest_decode_only_times_each_format_without_a_broker(capsys):
    assert ingest.main(["--decode-only", "--formats", "json,raw", "--bad", "0,0.05", "--samples", "2000"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\| json +\| 5 % +\| 2,000 +\| 100 ", out) and re.search(r"\| raw +\| 0 % ", out), out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compute_only_and_end_to_end_on_cuda(bootstrap):
    topic = unique("bench-gpu")
    fill_topic(bootstrap, topic, records("raw", 30_000))
    cfg = daemon_config(bootstrap, topic, "raw", MODELS["mlp"], snapshot_dir(), trainer={"device": "cuda"})
    assert compute_only(cfg, 5_000, 1_000).rate > 0
    e = end_to_end(cfg, 10_000, 2_000)
    assert e.samples >= 10_000
    assert 0 <= e.wait_fraction <= 1


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_neighbour_prints_each_case(capsys):
    assert neighbour.main(["--steps", "50", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    for case in neighbour.NEIGHBOURS:
        assert f"| {case}" in out


def test_calls_prints_its_table(bootstrap, capsys):
    assert calls.main(["--samples", "5000", "--repeat", "1", "--step-on", "slot,private", "--bootstrap", bootstrap]) == 0
    out = capsys.readouterr().out
    assert "| 1 " in out and "(default)" in out and "release median / mean" in out
    assert "| private " in out and "| slot " in out


def test_fetchwait_reads_the_topic_with_each_wait(bootstrap, capsys):
    assert fetchwait.main(["--records", "3000", "--waits", "default,500", "--seconds", "1", "--bootstrap", bootstrap]) == 0
    out = capsys.readouterr().out
    assert "| default (200) " in out and "| 500 " in out
    rates = [int(line.split("|")[2].replace(",", "")) for line in out.splitlines() if line.startswith(("| default", "| 500 "))]
    assert all(r > 0 for r in rates)  # both read the 3,000 records (a short topic: no broker is slow to serve it)


def test_frames_prints_each_way_of_taking_a_batch(capsys):
    assert frames.main(["--messages", "200", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "every frame waiting in one read" in out and "views made once" in out


def test_learning_compares_with_river_on_the_same_rows(bootstrap, capsys):
    pytest.importorskip("river")
    argv = ["--streams", "phishing,trump_approval,sea_drift", "--rows", "1500", "--actions", "log", "--window", "200"]
    argv += ["--drift-model", "logistic"]
    assert learning.main([*argv, "--bootstrap", bootstrap]) == 0
    out = capsys.readouterr().out
    assert "| phishing " in out and "| trump_approval " in out and "River linear" in out
    assert "samples to recover" in out and "next 10 windows" in out and "| sea_drift " in out
    rows = [line for line in out.splitlines() if line.startswith("| phishing ")]
    assert rows and "| 0 " in rows[0]  # trained through the broker with no skipped step
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    brier, ece = float(cells[5]), float(cells[6])  # calibration beside accuracy and log loss, and River's the same
    assert 0 < brier < 0.25 and 0 <= ece < 0.5
    river = [float(v) for v in cells[7].split(" / ")]
    assert len(river) == 4 and 0 < river[2] < 0.25 and 0 <= river[3] < 0.5


def test_learning_compares_categorical_streams_with_vw_and_river(bootstrap, capsys):
    pytest.importorskip("river")
    pytest.importorskip("vowpalwabbit")
    assert learning.main(["--categorical", "clicks,friedman_missing", "--rows", "600", "--bootstrap", bootstrap]) == 0
    out = capsys.readouterr().out
    for learner in ("streamtrain logistic", "streamtrain fm", "VW -b 18 -q ui", "River one-hot linear", "the hidden model (Bayes)"):
        assert any(line.startswith("| clicks") and learner in line for line in out.splitlines()), learner
    rows = [line for line in out.splitlines() if line.startswith("| friedman_missing") and "streamtrain linear" in line]
    assert rows and "| 0 " in rows[0], "nulls imputed: nothing dead-lettered"


def test_step_prints_each_case(capsys):
    assert step.main(["--steps", "20", "--calibration"]) == 0
    out = capsys.readouterr().out
    for case in step.CASES:
        assert f"{case}: " in out and "samples/s" in out
    for task in ("binary", "multiclass"):
        assert f"calibration sums, {task} batch 256: " in out
    assert step.main(["--cases", "logistic-1", "--steps", "20", "--candidates", "1,2", "--stack", "auto,off"]) == 0
    out = capsys.readouterr().out
    assert "logistic-1, 2 candidate(s), stacked: " in out and "logistic-1, 2 candidate(s), looped: " in out


def test_serve_prints_requests_and_latency_for_each_batch(capsys):
    """Each server (kserve's beside ours when the kserve extra is there) answers every case; start time, RSS and ratios follow."""
    pytest.importorskip("fastapi", reason="the serve extra")
    servers = ["fastapi"] + (["kserve"] if importlib.util.find_spec("kserve") else [])
    args = ["--requests", "20", "--batches", "1,64", "--clients", "2", "--protocols", "v1,v2", "--servers", ",".join(servers)]
    assert serve.main(args) == 0
    out = capsys.readouterr().out
    rows = [line.split("|") for line in out.splitlines() if line.startswith(tuple(f"| {s} " for s in servers)) and "| v" in line]
    assert len(rows) == 4 * len(servers) and all(r[5].strip() == "40" and r[-2].strip() == "0" for r in rows), out
    assert "start to ready s" in out and "RSS after load MiB" in out, out
    assert len(servers) == 1 or "kserve / fastapi requests/s" in out, out


def test_serve_forward_times_torch_and_onnxruntime(capsys):
    pytest.importorskip("onnxruntime", reason="the onnx extra")
    assert serve.main(["--forward", "--batches", "1", "--calls", "20"]) == 0
    out = capsys.readouterr().out
    assert all(f"| {m} " in out for m in ("linear", "mlp", "transformer")) and "torch / onnxruntime" in out, out


def test_fields_times_each_pass_over_consumed_messages(bootstrap, capsys):
    assert fields.main(["--format", "raw", "--samples", "3000", "--repeat", "1", "--bootstrap", bootstrap]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\| timestamp +\| [0-9,]+ ", out) and "decode (raw)" in out, out
