"""The `gpubackprop` command line, run in-process through cli.main."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK = [
    "--dataset",
    "spirals",
    "--epochs",
    "3",
    "--hidden",
    "16,8",
    "--verbose",
    "0",
    "--backend",
    "numpy",
]


def _run(argv, capsys):
    status = cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_train_writes_metrics_plot_and_checkpoint(tmp_path, capsys):
    metrics_path, plot_path = tmp_path / "m.json", tmp_path / "curves.png"
    checkpoint = tmp_path / "model.safetensors"
    status, out, _ = _run(
        [
            "train",
            *QUICK,
            "--metrics-json",
            str(metrics_path),
            "--plot",
            str(plot_path),
            "--save",
            str(checkpoint),
        ],
        capsys,
    )
    assert status == 0
    assert "test accuracy" in out and "wrote metrics" in out
    metrics = json.loads(metrics_path.read_text())
    for key in (
        "test_accuracy",
        "test_loss",
        "final_train_loss",
        "final_val_loss",
        "samples_per_s",
        "epochs",
        "backend",
        "device",
        "dtype",
        "seed",
        "wall_time_s",
    ):
        assert key in metrics, key
    assert metrics["epochs"] == 3 and metrics["backend"] == "numpy"
    assert metrics["dtype"] == "float32" and metrics["seed"] == 0
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["samples_per_s"] > 0
    assert len(metrics["history"]["loss"]) == 3 and len(metrics["history"]["val_loss"]) == 3
    assert metrics["final_val_loss"] == metrics["history"]["val_loss"][-1]
    assert metrics["n_val"] > 0 and "test_mse" not in metrics
    assert plot_path.read_bytes()[:8] == PNG_MAGIC and plot_path.stat().st_size > 5000

    model = gb.load(checkpoint, backend="numpy")
    from gpubackprop.data import load_dataset

    # the model standardises its inputs (its first layer): it takes the raw features
    data = load_dataset("spirals", val_fraction=0.1, standardize=False)
    evaluated = model.evaluate(data.x_test, data.y_test)
    assert evaluated["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-12)
    assert evaluated["loss"] == pytest.approx(metrics["test_loss"], rel=1e-6)


def test_train_is_reproducible_and_seeded(tmp_path, capsys):
    runs = []
    for seed in (0, 0, 1):
        path = tmp_path / f"m{len(runs)}.json"
        assert cli.main(["train", *QUICK, "--seed", str(seed), "--metrics-json", str(path)]) == 0
        runs.append(json.loads(path.read_text())["history"]["loss"])
    capsys.readouterr()
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_train_with_graph_trains_as_without(tmp_path, capsys):
    """--graph runs each step through gb.compile_step: on numpy the same eager step, so the
    same losses to the bit."""
    curves = []
    for flags in ([], ["--graph"]):
        path = tmp_path / f"m{len(curves)}.json"
        assert cli.main(["train", *QUICK, *flags, "--metrics-json", str(path)]) == 0
        curves.append(json.loads(path.read_text())["history"]["loss"])
    capsys.readouterr()
    assert curves[0] == curves[1] and len(curves[0]) >= 1


def test_train_max_norm_clips_inside_the_update(tmp_path, capsys):
    """--max-norm clips every step (fit(max_norm=...)): recorded in the metrics, the same
    losses with and without --graph, and other losses than unclipped training."""
    curves = []
    for flags in (["--max-norm", "0.05"], ["--max-norm", "0.05", "--graph"], []):
        path = tmp_path / f"m{len(curves)}.json"
        assert cli.main(["train", *QUICK, *flags, "--metrics-json", str(path)]) == 0
        metrics = json.loads(path.read_text())
        assert metrics["optimizer"]["max_norm"] == (0.05 if flags else None)
        curves.append(metrics["history"]["loss"])
    assert curves[0] == curves[1] and curves[0] != curves[2]
    with pytest.raises(SystemExit):
        cli.main(["train", "--max-norm", "0"])
    assert "--max-norm" in capsys.readouterr().err


def test_regression_reports_mse(tmp_path, capsys):
    path = tmp_path / "m.json"
    status, out, _ = _run(
        [
            "train",
            "--dataset",
            "regression",
            "--epochs",
            "2",
            "--hidden",
            "32",
            "--verbose",
            "0",
            "--metrics-json",
            str(path),
        ],
        capsys,
    )
    assert status == 0 and "test MSE" in out
    metrics = json.loads(path.read_text())
    assert metrics["task"] == "regression" and "test_accuracy" not in metrics
    assert metrics["test_mse"] == metrics["test_loss"] > 0


def test_config_file_with_command_line_override(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(
        json.dumps(
            {
                "dataset": "spirals",
                "epochs": 2,
                "hidden": [12, 5],
                "optimizer": "sgd",
                "lr": 0.02,
                "momentum": 0.5,
                "verbose": 0,
                "batch-size": 32,
            }
        )
    )
    path = tmp_path / "m.json"
    status, _, _ = _run(
        ["train", "--config", str(config), "--epochs", "4", "--metrics-json", str(path)], capsys
    )
    assert status == 0
    metrics = json.loads(path.read_text())
    assert metrics["epochs"] == 4  # the flag wins over the file
    assert metrics["batch_size"] == 32 and metrics["dataset"] == "spirals"
    assert metrics["optimizer"] == {
        "type": "SGD",
        "lr": 0.02,
        "momentum": 0.5,
        "weight_decay": 0.0,
        "schedule": "cosine",
        "max_norm": None,
    }
    widths = [
        layer["out_features"] for layer in metrics["model"]["layers"] if layer["type"] == "Dense"
    ]
    assert widths == [12, 5, 3]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"epoch": 3}, "unknown option 'epoch'"),
        ([1, 2], "expected a JSON object"),
        ("{broken", "not valid JSON"),
        ({"hidden": {"a": 1}}, "expected a list of widths"),
        ({"augment": "yes"}, "expected true or false"),
    ],
)
def test_bad_config_file(tmp_path, capsys, content, message):
    config = tmp_path / "bad.json"
    config.write_text(content if isinstance(content, str) else json.dumps(content))
    status, _, err = _run(["train", "--config", str(config)], capsys)
    assert status == 2
    assert message in err and "bad.json" in err
    status, _, err = _run(["train", "--config", str(tmp_path / "missing.json")], capsys)
    assert status == 2 and "does not exist" in err


def test_config_values_are_validated_like_flags(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"epochs": 0}))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--config", str(config)])
    assert exit_info.value.code == 2
    assert "--epochs: '0' is not an integer in [1, inf)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr", "-1"], "argument --lr: '-1' is not a number in (0, inf)"),
        (["--lr", "nan"], "argument --lr"),
        (["--hidden", "64,x"], "argument --hidden: '64,x' is not a list of layer widths"),
        (["--hidden", "0"], "argument --hidden"),
        (["--activation", "softmax"], "argument --activation: invalid choice: 'softmax'"),
        (["--optimizer", "rmsprop"], "argument --optimizer: invalid choice"),
        (["--epochs", "2.5"], "argument --epochs"),
        (["--batch-size", "0"], "argument --batch-size"),
        (["--val-fraction", "1"], "argument --val-fraction"),
        (["--momentum", "1.5", "--optimizer", "sgd"], "argument --momentum"),
        (["--dtype", "float16"], "argument --dtype: invalid choice"),
        (["--backend", "tpu"], "argument --backend: invalid choice"),
        (["--verbose", "3"], "argument --verbose"),
    ],
)
def test_bad_option_values_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--momentum", "0.5"], "--momentum applies to --optimizer sgd only, not 'adam'"),
        (["--dataset", "cifar"], "dataset='cifar' is not a data set; expected one of"),
        (["--dataset", "spirals", "--augment"], "--augment is only available for --dataset digits"),
        (["--dataset", "npz:/no/such/file.npz"], "does not exist"),
    ],
)
def test_bad_combinations_exit_2_with_message(capsys, argv, message):
    status, _, err = _run(["train", "--verbose", "0", *argv], capsys)
    assert status == 2
    assert message in err and err.startswith("gpubackprop train: error:")


def test_unwritable_outputs_fail_before_training(tmp_path, capsys):
    missing = tmp_path / "no" / "m.json"
    status, out, err = _run(["train", *QUICK, "--metrics-json", str(missing)], capsys)
    assert status == 2 and "does not exist" in err and out == ""
    status, _, err = _run(["train", *QUICK, "--plot", str(tmp_path)], capsys)
    assert status == 2 and "is a directory" in err


def test_plot_without_matplotlib_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    status, _, err = _run(["train", *QUICK, "--plot", str(tmp_path / "p.png")], capsys)
    assert status == 2
    assert "pip install 'gpubackprop[plot]'" in err
    assert not (tmp_path / "p.png").exists()


def test_verbose_2_prints_a_line_per_epoch(capsys):
    status, _, err = _run(["train", *QUICK[:-4], "--verbose", "2"], capsys)
    assert status == 0
    assert "epoch 1/3" in err and "epoch 3/3" in err and "val_loss" in err


def test_info_lists_backends(capsys):
    status, out, _ = _run(["info"], capsys)
    assert status == 0
    assert out.startswith(f"gpubackprop {gb.__version__}")
    for backend in ("numpy", "cupy", "emu"):
        assert f"  {backend} " in out
    assert "numpy  available: yes" in out
    assert "GPU:" in out and "kernels:" in out
    status, out, _ = _run(["info", "--json"], capsys)
    report = json.loads(out)
    assert set(report["backends"]) == {"numpy", "cupy", "emu"}
    assert report["backends"]["numpy"]["available"] is True
    for entry in report["backends"].values():
        assert entry["available"] or entry["reason"]
    assert "gemm.cu" in report["kernels"]["files"]
    assert report["emulator_cache"]["entries"] >= 0
    assert "emulator cache:" in _run(["info"], capsys)[1]


def test_info_survives_a_broken_kernel_inventory(capsys, monkeypatch):
    import gpubackprop.kernels

    def broken():
        raise FileNotFoundError("kernels/ is missing")

    monkeypatch.setattr(gpubackprop.kernels, "kernel_inventory", broken)
    status, out, _ = _run(["info"], capsys)
    assert status == 0 and "kernels/ is missing" in out and "numpy  available: yes" in out


def test_gradcheck_passes(capsys):
    status, out, _ = _run(["gradcheck"], capsys)
    assert status == 0
    assert "PASSED" in out and "input" in out and "0.weight" in out
    status, out, _ = _run(["gradcheck", "--loss", "mse", "--activation", "tanh"], capsys)
    assert status == 0


def test_gradcheck_fails_on_a_wrong_gradient(capsys, monkeypatch):
    from gpubackprop.backends import numpy_backend

    real = numpy_backend.activation_derivative

    def off_by_ten_percent(name, saved, alpha):
        return real(name, saved, alpha) * 1.1

    monkeypatch.setattr(numpy_backend, "activation_derivative", off_by_ten_percent)
    status, out, _ = _run(["gradcheck", "--activation", "tanh"], capsys)
    assert status == 1
    assert "FAIL" in out


def test_version_and_no_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"gpubackprop {gb.__version__}"
    status, out, _ = _run([], capsys)
    assert status == 2 and "train" in out and "info" in out


def test_a_subcommand_is_one_decorator(capsys, monkeypatch):
    monkeypatch.setattr(cli, "SUBCOMMANDS", dict(cli.SUBCOMMANDS))

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--times", type=int, default=1)

    @cli.subcommand("hello", "say hello", add_arguments)
    def hello(args: argparse.Namespace) -> int:
        print("hello " * args.times)
        return 3

    status, out, _ = _run(["hello", "--times", "2"], capsys)
    assert status == 3 and out.strip() == "hello hello"
    assert {"train", "info", "gradcheck"} <= set(cli.SUBCOMMANDS)


@pytest.mark.slow
def test_default_train_reaches_97_percent_on_digits(tmp_path, capsys):
    path = tmp_path / "m.json"
    status, out, _ = _run(
        ["train", "--backend", "numpy", "--verbose", "0", "--metrics-json", str(path)], capsys
    )
    assert status == 0
    metrics = json.loads(path.read_text())
    assert metrics["dataset"] == "digits" and metrics["n_test"] == 359
    assert metrics["test_accuracy"] >= 0.97, out
    assert np.isfinite(metrics["final_val_loss"])


def test_parity_reports_every_row_and_passes_on_the_emulator(capsys):
    ok, reason = gb.available_backends()["emu"]
    if not ok:
        pytest.skip(f"emu backend unavailable: {reason}")
    assert cli.main(["parity", "--backend", "emu"]) == 0
    out = capsys.readouterr().out
    assert "dense_forward[relu]" in out and "train20[relu,mse]" in out
    assert " 0 failed" in out


def test_parity_fails_when_a_kernel_op_is_wrong(capsys, monkeypatch):
    ok, reason = gb.available_backends()["emu"]
    if not ok:
        pytest.skip(f"emu backend unavailable: {reason}")
    from gpubackprop.backends.kernel_backend import KernelBackend

    original = KernelBackend.add
    monkeypatch.setattr(KernelBackend, "add", lambda self, a, b: original(self, a, a))
    assert cli.main(["parity", "--backend", "emu", "--failures-only"]) == 1
    out = capsys.readouterr().out
    assert "add" in out and "FAIL" in out and "dense_forward" not in out


def test_parity_refuses_an_unavailable_backend(capsys):
    if gb.available_backends()["cupy"][0]:
        pytest.skip("cupy is available here")
    assert cli.main(["parity", "--backend", "cupy"]) == 1
    assert "backend 'cupy' is not available" in capsys.readouterr().err


def test_cli_activation_order_starts_with_relu_and_ends_with_identity():
    """`gradcheck --activation all` puts the first one after the first Dense layer."""
    from gpubackprop.backends.base import ACTIVATIONS

    assert cli.CLI_ACTIVATIONS[0] == "relu" and cli.CLI_ACTIVATIONS[-1] == "identity"
    assert sorted(cli.CLI_ACTIVATIONS) == sorted(ACTIVATIONS)


# -- pipes, counts and the environment --------------------------------------------------------


def test_parity_failures_only_counts_every_row(capsys, monkeypatch):
    from gpubackprop import parity

    rows = [
        parity.ParityRow("add", "3x4", "numpy", "float32", "out", 0.0, 0.0, True),
        parity.ParityRow("mul", "3x4", "numpy", "float32", "out", 1.0, 1.0, False),
        parity.ParityRow("sub", "3x4", "numpy", "float32", "out", 0.0, 0.0, True),
    ]
    monkeypatch.setattr(parity, "parity_report", lambda *a, **k: parity.ParityReport(list(rows)))
    assert cli.main(["parity", "--backend", "numpy", "--failures-only"]) == 1
    out = capsys.readouterr().out
    assert "mul" in out and "add " not in out and "sub " not in out
    assert out.strip().endswith("2 passed, 1 failed")


def test_info_into_a_closed_pipe_exits_quietly():
    import os
    import subprocess

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte, as after `| head -1`
    try:
        child = subprocess.run(
            [sys.executable, "-m", "gpubackprop", "info"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    finally:
        os.close(write_end)
    assert child.returncode == 0, child.stderr
    assert child.stderr == ""


def test_broken_pipe_in_process_returns_zero(capsys, monkeypatch):
    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert cli.main(["info"]) == 0
    assert capsys.readouterr().err == ""


def test_empty_backend_variable_means_not_set(monkeypatch, capsys):
    from gpubackprop.backends import get_backend

    monkeypatch.setenv("GPUBACKPROP_BACKEND", "")
    assert get_backend().name == get_backend("auto").name
    monkeypatch.setenv("GPUBACKPROP_BACKEND", "  ")
    assert get_backend().name == get_backend("auto").name
    status, _, err = _run(["train", *QUICK[:-2], "--epochs", "1"], capsys)
    assert status == 0, err


def test_a_layer_too_large_for_memory_is_one_line(capsys):
    # 4e9 × 64 float64 weights are about 2 TB: no machine allocates that.
    status, _, err = _run(
        [
            "train",
            "--hidden",
            "4000000000",
            "--epochs",
            "1",
            "--verbose",
            "0",
            "--backend",
            "numpy",
        ],
        capsys,
    )
    assert status == 1
    assert err.count("\n") == 1, err
    assert err.startswith("gpubackprop train: error: out of memory") and "4000000000" in err


def test_a_huge_npz_label_is_one_line(tmp_path, capsys):
    path = tmp_path / "labels.npz"
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 40)
    y[7] = 10**9  # 10⁹ + 1 classes: an output layer of 256 × (10⁹ + 1) weights, 2 TB
    np.savez(path, x=rng.standard_normal((40, 3)), y=y)
    status, _, err = _run(
        ["train", "--dataset", f"npz:{path}", "--epochs", "1", "--verbose", "0"], capsys
    )
    assert status in (1, 2)
    assert err.count("\n") == 1, err
    assert "1000000001" in err


def test_summary_prints_the_total_rate_and_how_the_backend_was_chosen(
    tmp_path, capsys, monkeypatch
):
    import re

    from gpubackprop import backends
    from gpubackprop.backends import UnavailableBackend

    monkeypatch.delenv("GPUBACKPROP_BACKEND", raising=False)
    monkeypatch.setattr(backends, "_instances", dict(backends._instances))
    backends._instances["cupy"] = UnavailableBackend("cupy", "no GPU in this test; use numpy")
    metrics_path = tmp_path / "m.json"
    argv = ["train", *QUICK[:-2], "--metrics-json", str(metrics_path)]
    status, out, err = _run(argv, capsys)
    assert status == 0, err
    summary = out.strip().splitlines()[0]
    metrics = json.loads(metrics_path.read_text())
    rate = float(re.search(r"\(([\d,]+) samples/s\)", summary).group(1).replace(",", ""))
    total = metrics["n_train"] * metrics["epochs"] / metrics["train_time_s"]
    assert rate == pytest.approx(total, rel=1e-3, abs=1.0)
    assert metrics["total_samples_per_s"] == pytest.approx(total)
    assert "on numpy (auto: no GPU in this test), float32" in summary
    monkeypatch.setenv("GPUBACKPROP_BACKEND", "numpy")
    status, out, _ = _run(["train", *QUICK[:-2]], capsys)
    assert "on numpy (GPUBACKPROP_BACKEND=numpy), float32" in out
    status, out, _ = _run(["train", *QUICK], capsys)
    assert "on numpy, float32" in out
