"""The benchmark harness: schema, correctness gate, ratios, CLI outputs.  No speed assertions."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest

from gpubackprop import benchmarks as bench
from gpubackprop.backends import get_backend
from gpubackprop.benchmarks import cases, cli, report, run

ROW_KEYS = {
    "name",
    "backend",
    "shape",
    "dtype",
    "median_s",
    "tflops",
    "gbps",
    "floor_s",
    "max_rel_error",
    "vs",
    "status",
}


def tiny_config(**overrides) -> bench.BenchConfig:
    settings = dict(backends=["numpy"], preset="tiny", torch_compile="off", verbose=False)
    settings.update(overrides)
    return bench.BenchConfig(**settings)


@pytest.fixture(scope="module")
def tiny_record():
    return bench.run_benchmarks(tiny_config())


def test_record_has_the_specified_schema(tiny_record, tmp_path):
    record = tiny_record
    for key in (
        "timestamp",
        "git_commit",
        "versions",
        "devices",
        "ceilings",
        "results",
        "threads",
        "env",
        "skipped",
    ):
        assert key in record, key
    assert record["complete"] is True
    assert record["versions"]["numpy"] == np.__version__
    assert record["devices"]["numpy"]["class"] == "cpu"
    ceilings = record["ceilings"]["numpy"]
    assert ceilings["gemm_tflops"] > 0 and ceilings["copy_gbps"] > 0
    rows = record["results"]
    assert rows, "no rows"
    names = {r["name"] for r in rows}
    assert {
        "gemm.forward",
        "gemm.dW",
        "gemm.dX+dW",
        "relu.forward",
        "relu.backward",
        "softmax_cross_entropy",
        "sgd_momentum.step",
        "adam.step",
    } <= names
    assert any("train_step" in name for name in names)
    for row in rows:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["backend"] == "numpy" and row["dtype"] == "float32"
        assert row["status"] == "ok", (row["name"], row["reason"])
        assert row["median_s"] > 0 and row["floor_s"] > 0
        assert row["max_rel_error"] <= bench.RTOL["float32"]
        assert row["gbps"] > 0
        if row["name"].startswith("gemm") or "train_step" in row["name"]:
            assert row["tflops"] > 0
        else:
            assert row["tflops"] is None
    # The record is plain JSON.
    json.loads(report.write_json(record, tmp_path / "record.json").read_text())


def test_ratios_are_baseline_time_over_our_time(tiny_record):
    pytest.importorskip("torch")
    checked = 0
    for row in tiny_record["results"]:
        for name, ratio in row["vs"].items():
            expected = row["baselines"][name]["median_s"] / row["median_s"]
            assert ratio == pytest.approx(expected)
            checked += 1
        assert "torch" in row["vs"], row["name"]
    assert checked >= len(tiny_record["results"])


def test_speed_ratio_above_one_means_we_are_faster():
    assert bench.speed_ratio(baseline_s=3.0, ours_s=1.5) == 2.0
    assert bench.speed_ratio(baseline_s=1.0, ours_s=4.0) == 0.25
    assert bench.speed_ratio(None, 1.0) is None
    assert bench.speed_ratio(1.0, 0.0) is None


def test_max_rel_error_is_normwise_and_catches_nan_and_shape():
    ref = np.array([[1.0, -4.0], [0.0, 2.0]])
    out = ref + np.array([[0.0, 0.0], [0.04, 0.0]])
    assert bench.max_rel_error([out], [ref]) == pytest.approx(0.01)
    assert bench.max_rel_error([ref.astype(np.float32)], [ref]) == 0.0
    assert bench.max_rel_error([np.full((2, 2), np.nan)], [ref]) == math.inf
    assert bench.max_rel_error([ref[:1]], [ref]) == math.inf
    # The worst of several tensors counts.
    assert bench.max_rel_error([ref, out], [ref, ref]) == pytest.approx(0.01)


def test_a_wrong_op_fails_its_row_and_is_not_timed(monkeypatch):
    backend = get_backend("numpy")
    original = backend.dense_forward
    calls = {"n": 0}

    def wrong_forward(x, weight, bias, activation, alpha=0.01, *args, **kwargs):
        calls["n"] += 1
        y, saved = original(x, weight, bias, activation, alpha, *args, **kwargs)
        return y * np.float32(1.01), saved  # 1% off: far outside float32 tolerance

    monkeypatch.setattr(backend, "dense_forward", wrong_forward)
    record = bench.run_benchmarks(tiny_config(only=("gemm.forward",), torch=False))
    (row,) = record["results"]
    assert row["status"] == "failed"
    assert row["max_rel_error"] == pytest.approx(0.01, rel=1e-3)
    assert row["median_s"] is None and row["vs"] == {} and row["baselines"] == {}
    assert "not timed" in row["reason"]
    assert calls["n"] == 1  # the check ran it once; timing never did


def test_a_wrong_training_step_fails_and_cli_exits_nonzero(monkeypatch, tmp_path):
    backend = get_backend("numpy")
    original = backend.sgd_step

    def wrong_sgd(param, grad, momentum_buf, **kwargs):
        kwargs["lr"] *= 3.0
        original(param, grad, momentum_buf, **kwargs)

    monkeypatch.setattr(backend, "sgd_step", wrong_sgd)
    path = tmp_path / "record.json"
    status = bench.main(
        [
            "--preset",
            "tiny",
            "--backend",
            "numpy",
            "--only",
            "train_step",
            "--no-torch",
            "--quiet",
            "--json",
            str(path),
        ]
    )
    assert status == 1
    (row,) = json.loads(path.read_text())["results"]
    assert "train_step" in row["name"] and row["status"] == "failed"


def test_cli_writes_json_results_file_and_plot(tmp_path, capsys):
    json_path, results_dir, plot = tmp_path / "r.json", tmp_path / "results", tmp_path / "p.png"
    status = bench.main(
        [
            "--preset",
            "tiny",
            "--backend",
            "numpy",
            "--only",
            "relu",
            "--only",
            "adam",
            "--no-torch",
            "--quiet",
            "--json",
            str(json_path),
            "--append-results",
            "--results-dir",
            str(results_dir),
            "--plot",
            str(plot),
        ]
    )
    assert status == 0
    record = json.loads(json_path.read_text())
    assert {r["name"] for r in record["results"]} == {"relu.forward", "relu.backward", "adam.step"}
    (written,) = list(results_dir.glob("*.json"))
    assert written.name.startswith(record["timestamp"][:10])
    assert json.loads(written.read_text())["results"] == record["results"]
    # A second run on the same day and commit does not overwrite the first.
    bench.main(
        [
            "--preset",
            "tiny",
            "--backend",
            "numpy",
            "--only",
            "relu.forward",
            "--no-torch",
            "--quiet",
            "--append-results",
            "--results-dir",
            str(results_dir),
        ]
    )
    assert len(list(results_dir.glob("*.json"))) == 2
    out = capsys.readouterr().out
    assert "relu.forward" in out and "ceilings [numpy]" in out
    pytest.importorskip("matplotlib")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_backend_without_a_gpu_is_skipped_with_a_reason(tmp_path, capsys):
    cupy_backend = get_backend("auto")
    if cupy_backend.name == "cupy":
        pytest.skip("a GPU is present: the cupy rows run instead")
    path = tmp_path / "r.json"
    status = bench.main(
        ["--preset", "tiny", "--backend", "cupy", "--no-torch", "--quiet", "--json", str(path)]
    )
    assert status == 1  # nothing measured is not a pass
    assert "no row ran" in capsys.readouterr().err
    record = json.loads(path.read_text())
    assert record["results"] == []
    (skipped,) = record["skipped"]
    assert skipped["backend"] == "cupy" and "not available" in skipped["reason"]


def test_backend_option_takes_lists_and_repeats():
    parser = bench.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--quick", "--backend", "numpy,emu", "--backend", "cupy"])
    assert args.quick and cli.split_backends(args.backend) == ["numpy", "emu", "cupy"]
    assert cli.split_backends(None) is None


def test_memory_bound_inputs_are_rotated_past_the_cache():
    small = bench.activation_case("relu", 64, 64, "forward", 4)
    big = bench.activation_case("relu", 4096, 4096, "forward", 4)
    gemm = bench.gemm_case(64, 64, 64, "forward", 4)
    cache = 1 << 20
    copies = run.copies_for(small, cache)
    assert copies * small.working_set >= 3 * cache
    assert run.copies_for(big, cache) == 1
    assert run.copies_for(gemm, cache) == 1
    take = cases.cycle(["a", "b", "c"])
    assert [take() for _ in range(5)] == ["a", "b", "c", "a", "b"]


def test_training_step_flop_count():
    sizes, batch = (784, 1024, 1024, 10), 256
    parts = cases.train_parts(sizes, batch, 4)
    macs = 784 * 1024 + 1024 * 1024 + 1024 * 10
    # forward + dW for every layer, dX for all but the first (no input gradient).
    assert sum(p.flops for p in parts) == 6 * batch * macs - 2 * batch * 784 * 1024


def test_record_is_handed_out_after_every_row():
    """--json rewrites its file after each row, so a run cut short keeps what it measured."""
    seen = []

    def on_row(record):
        seen.append((len(record["results"]), record["complete"]))

    record = bench.run_benchmarks(tiny_config(only=("relu",), on_row=on_row))
    assert len(record["results"]) >= 2
    assert seen == [(i, False) for i in range(1, len(record["results"]) + 1)]


def test_warm_up_never_lets_asynchronous_launches_pile_up():
    """On a GPU a call only queues work; warm-up is bounded by host time, so it must wait for
    each call or thousands would queue (seconds of device work for a large GEMM)."""

    class QueueTimer:
        """A stand-in for an asynchronous device: calls queue until sync or time()."""

        def __init__(self):
            self.queued, self.most_queued = 0, 0

        def launch(self):
            self.queued += 1
            self.most_queued = max(self.most_queued, self.queued)

        def sync(self):
            self.queued = 0

        def time(self, fn, calls):
            for _ in range(calls):
                fn()
            self.sync()
            return 1e-6

    timer = QueueTimer()
    settings = bench.TimingSettings(
        warmup_calls=50, warmup_s=0.0, batch_s=0.0, min_rounds=2, max_rounds=2, budget_s=0.0
    )
    stats = bench.measure({"ours": bench.Impl(timer.launch, timer)}, settings)
    assert stats["ours"].median_s == pytest.approx(1e-6)
    assert timer.most_queued == 1


def test_source_root_is_the_checkout_that_holds_the_package():
    """Records go to <checkout>/bench/results and name the checkout's commit."""
    import gpubackprop
    from gpubackprop.benchmarks import machine

    package_parent = Path(gpubackprop.__file__).resolve().parents[1]
    expected = package_parent if (package_parent / "bench").is_dir() else None
    assert machine.source_root() == expected
    if expected is not None:
        assert bench.run_benchmarks.__module__ == "gpubackprop.benchmarks.run"
        assert report.default_results_dir() == expected / "bench" / "results"


def test_host_rows_record_their_launches(tmp_path):
    """`bench --only host`: the host rows alone, each with the kernel launches it made (a fused
    dense forward is one GEMM launch; a training step launches every layer's kernels)."""
    path = tmp_path / "host.json"
    status = cli.main(["--only", "host", "--no-torch", "--quiet", "--json", str(path)])
    assert status == 0
    record = json.loads(path.read_text())
    rows = {r["name"]: r for r in record["results"]}
    assert set(rows) >= {
        "host.dense_forward",
        "host.dense_backward",
        "host.softmax_cross_entropy",
        "host.adam.step",
        "host.train_step.mlp_64-128-128-10",
    }
    assert all(r["backend"] == "host" and r["status"] == "ok" for r in rows.values())
    assert all(r["median_s"] > 0 for r in rows.values())
    assert rows["host.dense_forward"]["launches"] == 1
    # The optimizer rows time the step a training step makes: one update launch, which counts
    # the step itself; clipped, the norm's reduction and coefficient first, no scale launch.
    assert rows["host.adam.step"]["launches"] == 1
    assert rows["host.sgd_momentum.step"]["launches"] == 1
    assert rows["host.adam.clipped.step"]["launches"] == 3
    assert rows["host.softmax_cross_entropy"]["launches"] == 3  # the loss, its sum in two
    step = rows["host.train_step.mlp_64-128-128-10"]["launches"]
    ops = sum(rows[f"host.{op}"]["launches"] for op in ("dense_backward", "softmax_cross_entropy"))
    assert step > 3 + ops  # three forward GEMMs, the loss, three backwards and the update
    assert "numpy" not in record["ceilings"]  # --only host ran no other backend


def test_recording_seam_records_without_running():
    from gpubackprop.backends.recording import HostBackend

    backend = HostBackend()
    x = np.ones((5, 3), np.float32)
    w = np.ones((7, 3), np.float32)
    y, _ = backend.dense_forward(x, w, None, "relu")
    assert y.shape == (5, 7)
    (launch,) = backend.seam.launches
    assert launch.file == "gemm.cu" and launch.kernel == "dense_forward"
    assert launch.grid == (1, 1, 1) and launch.args[0] is x and launch.args[1] is w


def test_tables_explain_their_ratio_columns(tiny_record):
    from gpubackprop.benchmarks.report import format_markdown, format_table

    for table in (format_table(tiny_record), format_markdown(tiny_record)):
        assert "of floor: the floor" in table and "Above 100% the row beat the ceilings" in table
        if any(row["vs"] for row in tiny_record["results"]):
            assert "vs <baseline>: the baseline's median time divided by ours" in table


def test_tensor_core_gemm_rows_run_checked_on_the_emulator():
    """The bf16 and tf32 rows (GEMMs against cuBLAS at the same precision, training steps
    against PyTorch bf16 autocast on a GPU) build, pass their check against the reference of
    their precision and are timed on emu."""
    from gpubackprop.emulator import find_compiler

    if find_compiler() is None:
        pytest.skip("no C++ compiler for the emulator")
    wanted = ["gemm.forward.bf16", "gemm.dX+dW.tf32", "train_step.mlp_12-16-5.bf16"]
    record = bench.run_benchmarks(tiny_config(backends=["emu"], only=wanted))
    rows = {r["name"]: r for r in record["results"]}
    assert set(rows) == set(wanted)
    for row in rows.values():
        assert row["status"] == "ok" and row["max_rel_error"] <= row["rtol"], row
    # numpy and float64 get no tensor-core rows
    assert not [
        r
        for r in bench.run_benchmarks(tiny_config(only=["bf16"]))["results"]
        if "bf16" in r["name"]
    ]
