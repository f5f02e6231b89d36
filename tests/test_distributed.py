"""Data-parallel training (gpubackprop/distributed.py).

The tests that need several ranks start this file under ``mpiexec -n 2`` (the mpich wheel's
launcher, from the ``mpi`` extra): run as a script it is the worker, which writes what each
rank holds after every step to a folder; the test, in the pytest process, compares the ranks
with each other and with a one-process run of the same training.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop import distributed as dist

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent

# 20 steps of the global batch B, split over the ranks (B = 24: 12 rows a rank; B = 25: 13 and
# 12, the uneven split rule); float64 throughout.
STEPS = 20
FEATURES, HIDDEN, OUTPUTS = 7, 11, 3
# Two ranks and one process add the same per-row terms in another order (each rank sums its
# half of the batch in the dW GEMM and the bias sum, then the halves are added), so each step's
# gradient differs in its last bits: ~1e-16 relative in float64.  Adam divides by √v̂, which
# can amplify that for coordinates whose gradient is near zero, so 20 steps stay well inside
# 1e-10 relative to the parameters' size while any real error (a wrong weight, a missed or
# double-counted row: ~1e-2) is far outside it.
RTOL = 1e-10
CASES = [
    ("sgd", None, 24),
    ("sgd", 0.05, 24),
    ("adam", None, 24),
    ("adam", 0.05, 24),
    ("sgd", None, 25),
]
# A "sum" loss: the ranks' gradients are added, not weighted (uneven shards 13/12).
SUM_CASE = ("sgd", None, 25)
# Three ranks (not a power of two: MPI reduces in another pattern), uneven shards 9/8/8.
THREE_RANK_CASE = ("adam", 0.05, 25)
# The emu backend all-reduces the host memory of its arrays (CuPy-like device arrays in the
# worker: GPUBACKPROP_EMU_DEVICE_ARRAYS=1); a few steps, the emulator being slow.
EMU_CASE, EMU_STEPS = ("adam", 0.05, 24), 4
# gb.compile_step(data_parallel=): on emu two graphs a step around the MPI all-reduce; on numpy
# eager.  Either way bitwise the eager data-parallel loop of the same case on the same backend.
COMPILED_NUMPY_CASES = [("adam", 0.05, 24), ("sgd", None, 25)]


def _case_name(optimizer: str, max_norm: float | None, batch: int, backend="numpy") -> str:
    return f"{backend}-{optimizer}-{'clip' if max_norm else 'noclip'}-b{batch}"


def _model_and_optimizer(optimizer: str, seed: int, hidden: int = HIDDEN, backend="numpy"):
    gb.seed(seed)
    model = gb.Sequential(
        gb.Dense(FEATURES, hidden),
        gb.Tanh(),
        gb.Residual(gb.Dense(hidden, hidden), gb.ReLU()),
        gb.Dense(hidden, OUTPUTS),
    ).to(backend, dtype="float64")
    if optimizer == "sgd":
        opt = gb.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    else:
        opt = gb.Adam(model.parameters(), lr=1e-2)
    return model, opt


def _data(rows: int):
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((rows, FEATURES))
    y = rng.integers(0, OUTPUTS, size=rows)
    return x, y


def _train_steps(
    optimizer: str,
    max_norm: float | None,
    batch: int,
    parallel_group=None,
    backend: str = "numpy",
    steps: int = STEPS,
    summed_mse: bool = False,
    compiled: dict | None = None,
):
    """``steps`` steps on consecutive global batches; returns the flat parameters after each.
    With a group: every rank takes its shard and the gradients are averaged.  The loss is
    cross-entropy (a mean), or with ``summed_mse`` MSELoss(reduction="sum") on one-hot targets
    (the ranks' gradients add up without weights).  With ``compiled`` (a dict, filled with
    what the step captured) the steps go through gb.compile_step instead of the public calls."""
    rank = 0 if parallel_group is None else parallel_group.rank
    # Ranks other than 0 start from other weights: the broadcast must replace them.
    model, opt = _model_and_optimizer(optimizer, seed=100 * rank, backend=backend)
    loss = (gb.MSELoss("sum") if summed_mse else gb.SoftmaxCrossEntropyLoss()).to(model.backend)
    x, y = _data(steps * batch)
    if summed_mse:
        y = np.eye(OUTPUTS)[y]
        opt.lr = opt.lr / batch  # the summed gradient is ~batch times the mean's
    parallel = None
    if parallel_group is not None:
        parallel = dist.DataParallel(parallel_group, model, loss, opt)
        parallel.start(dist.training_setup(model, opt, loss, len(x), batch))
    after = []
    compiled_step = None
    if compiled is not None:
        compiled_step = gb.compile_step(model, loss, opt, max_norm, data_parallel=parallel)
    for step in range(steps):
        start, stop = step * batch, (step + 1) * batch
        lo, hi = (start, stop) if parallel is None else parallel.shard(start, stop)
        target = y[lo:hi] if summed_mse else y[lo:hi].astype(np.int64)
        if compiled_step is not None:
            compiled_step(x[lo:hi], target, None if parallel is None else stop - start)
            after.append(np.array(model.backend.to_numpy(model.store.data)))
            continue
        pred = model.forward(x[lo:hi])
        loss.forward(pred, model.backend.asarray(target))
        model.backward(loss.backward(), need_input_grad=False)
        if parallel is not None:
            parallel.average_gradients(hi - lo, stop - start)
        if max_norm is not None:
            gb.clip_grad_norm(model.parameters(), max_norm)
        opt.step()
        after.append(np.array(model.backend.to_numpy(model.store.data)))
    if compiled_step is not None:
        compiled.update(
            graphs_per_step=compiled_step.graphs_per_step, graphs=len(compiled_step.graphs)
        )
    return np.stack(after)


def _fit_run(distributed: bool, verbose: int = 0, checkpoint: Path | None = None):
    """fit with shuffling, an uneven last batch (100 rows, batch 24) and validation data."""
    model, opt = _model_and_optimizer("adam", seed=0 if not distributed else 100 * dist.rank())
    gb.seed(7 + 13 * dist.rank())  # the shuffling generator: rank 0's is broadcast
    x, y = _data(100)
    xv, yv = _data(33)
    history = model.fit(
        x,
        y,
        loss=gb.SoftmaxCrossEntropyLoss(),
        optimizer=opt,
        epochs=3,
        batch_size=24,
        validation_data=(xv + 0.5, yv),
        verbose=verbose,
        distributed=distributed,
        callbacks=[] if checkpoint is None else [gb.ModelCheckpoint(checkpoint)],
    )
    return np.array(model.store.data), history.history


def _emu_fit(graph: bool):
    """fit(distributed=True, max_norm=0.05) on emu with shuffling, 17 rows in batches of 8:
    the last global batch has one row, so on two ranks rank 0 has none (it adds a zero
    gradient, then clips and updates as the other rank does)."""
    gb.seed(5 + dist.rank())  # the shuffling generator: rank 0's is broadcast
    model, opt = _model_and_optimizer("adam", seed=100 * dist.rank(), backend="emu")
    x, y = _data(17)
    model.fit(
        x,
        y,
        loss=gb.SoftmaxCrossEntropyLoss(),
        optimizer=opt,
        epochs=1,
        batch_size=8,
        verbose=0,
        graph=graph,
        distributed=True,
        max_norm=0.05,
    )
    return np.array(model.backend.to_numpy(model.store.data))


# -- the worker: run under mpiexec --------------------------------------------------------------


def _worker(scenario: str, out: Path) -> None:
    group = dist.init()
    rank = group.rank
    if scenario == "train":
        for optimizer, max_norm, batch in CASES:
            params = _train_steps(optimizer, max_norm, batch, group)
            np.save(out / f"{_case_name(optimizer, max_norm, batch)}.rank{rank}.npy", params)
        params = _train_steps(*EMU_CASE, group, backend="emu", steps=EMU_STEPS)
        np.save(out / f"{_case_name(*EMU_CASE, backend='emu')}.rank{rank}.npy", params)
        # each rank names its own checkpoint file: only rank 0's may appear
        checkpoint = out / f"checkpoint.rank{rank}.safetensors"
        params, history = _fit_run(distributed=True, verbose=2, checkpoint=checkpoint)
        np.save(out / f"fit.rank{rank}.npy", params)
        (out / f"fit.rank{rank}.json").write_text(json.dumps(history))
        params = _train_steps(*SUM_CASE, group, summed_mse=True)
        np.save(out / f"sum.rank{rank}.npy", params)
        captured: dict = {}
        for case in COMPILED_NUMPY_CASES:
            captured[_case_name(*case)] = info = {}
            params = _train_steps(*case, group, compiled=info)
            np.save(out / f"{_case_name(*case)}.compiled.rank{rank}.npy", params)
        captured[_case_name(*EMU_CASE, backend="emu")] = info = {}
        params = _train_steps(*EMU_CASE, group, backend="emu", steps=EMU_STEPS, compiled=info)
        np.save(out / f"{_case_name(*EMU_CASE, backend='emu')}.compiled.rank{rank}.npy", params)
        for graph in (False, True):
            np.save(out / f"emu_fit.graph{int(graph)}.rank{rank}.npy", _emu_fit(graph))
        (out / f"captured.rank{rank}.json").write_text(json.dumps(captured))
    elif scenario == "three":
        params = _train_steps(*THREE_RANK_CASE, group)
        np.save(out / f"three.rank{rank}.npy", params)
    elif scenario == "raise":

        class FailOnRankOne(gb.Callback):
            def on_epoch_end(self, epoch, logs):
                if rank == 1:
                    raise RuntimeError("rank one gives up after epoch 1")

        model, opt = _model_and_optimizer("sgd", seed=0)
        x, y = _data(64)
        try:  # caught, as the CLI catches errors to print them: fit itself must abort
            model.fit(
                x,
                y,
                loss=gb.SoftmaxCrossEntropyLoss(),
                optimizer=opt,
                epochs=50,
                batch_size=16,
                verbose=0,
                callbacks=[FailOnRankOne()],
                distributed=True,
            )
        except RuntimeError:
            print("rank caught the error and carried on", flush=True)
        group.comm.Barrier()
        print("rank finished training", flush=True)
    elif scenario == "start_fails":
        # Rank 1 fails while fit sets the ranks up (rank 0 waits in the setup exchange), and
        # the caller catches the error: fit itself must end the job.
        class LossThatCannotDescribeItself(gb.SoftmaxCrossEntropyLoss):
            def config(self):
                raise RuntimeError("rank one's loss cannot describe itself")

        model, opt = _model_and_optimizer("sgd", seed=0)
        x, y = _data(64)
        loss = LossThatCannotDescribeItself() if rank == 1 else gb.SoftmaxCrossEntropyLoss()
        try:
            model.fit(x, y, loss=loss, optimizer=opt, verbose=0, distributed=True)
        except RuntimeError:
            print("rank caught the error and carried on", flush=True)
        group.comm.Barrier()
        print("rank finished training", flush=True)
    elif scenario == "uncaught":
        # Outside fit: rank 1 fails in the user's own code while rank 0 waits in a collective.
        if rank == 1:
            raise KeyError("rank one's own code fails")
        group.comm.Barrier()
        print("rank passed the barrier", flush=True)
    elif scenario == "mismatch":
        model, opt = _model_and_optimizer("sgd", seed=0, hidden=HIDDEN + rank)
        x, y = _data(64)
        model.fit(x, y, loss=gb.SoftmaxCrossEntropyLoss(), optimizer=opt, distributed=True)
    else:
        raise ValueError(scenario)


# -- launching ----------------------------------------------------------------------------------


def _mpiexec() -> str:
    pytest.importorskip("mpi4py", reason="the mpi extra is not installed: pip install '.[mpi]'")
    launcher = Path(sys.executable).parent / "mpiexec"
    found = str(launcher) if launcher.is_file() else shutil.which("mpiexec")
    if found is None:
        pytest.skip("no mpiexec next to the interpreter or on PATH: pip install '.[mpi]'")
    return found


def _launch(ranks: int, argv: list[str], tmp_path: Path, timeout: float = 120):
    env = dict(
        os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", GPUBACKPROP_EMU_DEVICE_ARRAYS="1"
    )
    return subprocess.run(
        [_mpiexec(), "-n", str(ranks), sys.executable, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
        env=env,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One mpiexec -n 2 run of every training case (start-up paid once)."""
    out = tmp_path_factory.mktemp("ranks")
    result = _launch(2, [str(HERE), "train", str(out)], out)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result


@pytest.mark.parametrize("optimizer,max_norm,batch", CASES)
def test_two_ranks_match_one_process_and_each_other(trained, optimizer, max_norm, batch):
    out, _ = trained
    name = _case_name(optimizer, max_norm, batch)
    rank0 = np.load(out / f"{name}.rank0.npy")
    rank1 = np.load(out / f"{name}.rank1.npy")
    assert rank0.shape == rank1.shape == (STEPS, rank0.shape[1])
    for step in range(STEPS):  # bitwise identical on every rank after every step
        assert np.array_equal(rank0[step], rank1[step]), f"ranks differ after step {step}"
    single = _train_steps(optimizer, max_norm, batch)
    scale = np.max(np.abs(single), axis=1, keepdims=True)
    error = np.max(np.abs(rank0 - single) / scale)
    assert error <= RTOL, f"{name}: two ranks differ from one process by {error:.3g}"
    # the run moved: the comparison is not between two copies of the initial weights
    assert np.max(np.abs(single[-1] - single[0])) > 1e-2


def test_sum_reduction_adds_the_ranks_gradients(trained):
    out, _ = trained
    rank0, rank1 = np.load(out / "sum.rank0.npy"), np.load(out / "sum.rank1.npy")
    assert np.array_equal(rank0, rank1)
    single = _train_steps(*SUM_CASE, summed_mse=True)
    scale = np.max(np.abs(single), axis=1, keepdims=True)
    assert np.max(np.abs(rank0 - single) / scale) <= RTOL
    assert np.max(np.abs(single[-1] - single[0])) > 1e-2


def test_three_ranks_stay_bitwise_identical_and_match_one_process(tmp_path):
    result = _launch(3, [str(HERE), "three", str(tmp_path)], tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [np.load(tmp_path / f"three.rank{r}.npy") for r in range(3)]
    for step in range(STEPS):
        assert np.array_equal(ranks[0][step], ranks[1][step]), step
        assert np.array_equal(ranks[0][step], ranks[2][step]), step
    single = _train_steps(*THREE_RANK_CASE)
    scale = np.max(np.abs(single), axis=1, keepdims=True)
    assert np.max(np.abs(ranks[0] - single) / scale) <= RTOL


def test_emu_ranks_match_one_numpy_process(trained):
    available, reason = gb.available_backends()["emu"]
    if not available:
        pytest.skip(f"backend 'emu' is unavailable here: {reason}")
    out, _ = trained
    name = _case_name(*EMU_CASE, backend="emu")
    rank0 = np.load(out / f"{name}.rank0.npy")
    rank1 = np.load(out / f"{name}.rank1.npy")
    assert all(np.array_equal(a, b) for a, b in zip(rank0, rank1))
    single = _train_steps(*EMU_CASE, steps=EMU_STEPS)
    # the emulated kernels against the NumPy reference: float64 GEMMs summed in another order
    np.testing.assert_allclose(rank0, single, rtol=0, atol=1e-9 * np.max(np.abs(single)))


def _emu_or_skip() -> None:
    available, reason = gb.available_backends()["emu"]
    if not available:
        pytest.skip(f"backend 'emu' is unavailable here: {reason}")


def test_captured_distributed_step_on_emu_is_bitwise_the_eager_one(trained):
    """compile_step(data_parallel=) on emu: two graphs a step (forward+loss+backward and the
    n_r / B weighting; clipping and Adam) with MPI's all-reduce between them; after every step
    the same bits as the eager data-parallel loop, and the same on both ranks."""
    _emu_or_skip()
    out, _ = trained
    name = _case_name(*EMU_CASE, backend="emu")
    eager = np.load(out / f"{name}.rank0.npy")
    for rank in (0, 1):
        compiled = np.load(out / f"{name}.compiled.rank{rank}.npy")
        assert compiled.shape == eager.shape
        for step in range(EMU_STEPS):
            assert np.array_equal(compiled[step], eager[step]), (rank, step)
        captured = json.loads((out / f"captured.rank{rank}.json").read_text())[name]
        assert captured == {"graphs_per_step": 2, "graphs": 1}


def test_distributed_graph_fit_on_emu_is_bitwise_the_eager_fit(trained):
    """fit(graph=True, distributed=True) on emu, with a last global batch of one row (rank 0
    has none: it adds a zero gradient and applies the same update, eagerly)."""
    _emu_or_skip()
    out, _ = trained
    eager = [np.load(out / f"emu_fit.graph0.rank{rank}.npy") for rank in (0, 1)]
    graph = [np.load(out / f"emu_fit.graph1.rank{rank}.npy") for rank in (0, 1)]
    assert np.array_equal(eager[0], eager[1])
    assert np.array_equal(graph[0], eager[0]) and np.array_equal(graph[1], eager[0])
    start, _ = _model_and_optimizer("adam", seed=0)
    assert np.max(np.abs(eager[0] - start.store.data)) > 1e-3  # it trained


@pytest.mark.parametrize("case", COMPILED_NUMPY_CASES, ids=lambda c: str(c))
def test_compiled_distributed_step_on_numpy_is_bitwise_the_eager_one(trained, case):
    out, _ = trained
    name = _case_name(*case)
    eager = np.load(out / f"{name}.rank0.npy")
    for rank in (0, 1):
        assert np.array_equal(np.load(out / f"{name}.compiled.rank{rank}.npy"), eager), rank
        captured = json.loads((out / f"captured.rank{rank}.json").read_text())[name]
        assert captured == {"graphs_per_step": 0, "graphs": 0}  # numpy: eager


def test_clipping_was_active(trained):
    """The clip cases must clip, or they test nothing more than the plain ones."""
    out, _ = trained
    clipped = np.load(out / f"{_case_name('sgd', 0.05, 24)}.rank0.npy")
    plain = np.load(out / f"{_case_name('sgd', None, 24)}.rank0.npy")
    assert np.max(np.abs(clipped - plain)) > 1e-3


def test_distributed_fit_matches_fit_and_rank_zero_alone_prints(trained):
    out, result = trained
    params0 = np.load(out / "fit.rank0.npy")
    params1 = np.load(out / "fit.rank1.npy")
    assert np.array_equal(params0, params1)
    single, history = _fit_run(distributed=False)
    scale = np.max(np.abs(single))
    assert np.max(np.abs(params0 - single)) / scale <= RTOL
    for rank in (0, 1):
        reduced = json.loads((out / f"fit.rank{rank}.json").read_text())
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            np.testing.assert_allclose(reduced[key], history[key], rtol=1e-9, err_msg=key)
    assert (out / "checkpoint.rank0.safetensors").is_file()
    assert not (out / "checkpoint.rank1.safetensors").exists()
    # verbose=2 prints one line per epoch, from rank 0 only: 3 epochs, 3 lines
    assert result.stderr.count("epoch 1/3") == 1
    assert result.stderr.count("epoch 3/3") == 1


def test_failing_rank_stops_every_rank(tmp_path):
    """Rank 1 raises after epoch 1 while rank 0 waits in the next all-reduce: the job must
    end with an error (MPI_Abort) well before the 60 s timeout, not hang."""
    result = _launch(2, [str(HERE), "raise", str(tmp_path)], tmp_path, timeout=60)
    assert result.returncode != 0
    assert "rank 1 of 2 failed" in result.stderr
    assert "rank one gives up after epoch 1" in result.stderr
    assert "rank finished training" not in result.stdout
    assert "carried on" not in result.stdout


def test_rank_failing_while_fit_starts_stops_every_rank(tmp_path):
    result = _launch(2, [str(HERE), "start_fails", str(tmp_path)], tmp_path, timeout=60)
    assert result.returncode != 0
    assert "rank 1 of 2 failed" in result.stderr
    assert "rank one's loss cannot describe itself" in result.stderr
    assert "carried on" not in result.stdout and "finished" not in result.stdout


def test_uncaught_error_after_init_stops_every_rank(tmp_path):
    result = _launch(2, [str(HERE), "uncaught", str(tmp_path)], tmp_path, timeout=60)
    assert result.returncode != 0
    assert "rank one's own code fails" in result.stderr
    assert "rank passed the barrier" not in result.stdout


def test_ranks_with_different_models_fail_naming_the_difference(tmp_path):
    """Every rank raises the same error at fit's start and stops by itself (no MPI_Abort)."""
    result = _launch(2, [str(HERE), "mismatch", str(tmp_path)], tmp_path, timeout=60)
    assert result.returncode != 0
    message = f"model.layers[0].out_features is {HIDDEN} on rank 0 but {HIDDEN + 1} on rank 1"
    assert result.stderr.count(message) == 2
    assert "MPI_Abort" not in result.stderr


def test_cli_train_distributed_matches_one_process(tmp_path):
    """`mpiexec -n 2 gpubackprop train --distributed --graph` optimises as the one-process
    command does (same global batch), and rank 0 alone prints and writes.  (--graph: the
    compiled step, on numpy eager, with the all-reduce between backward and the update.)"""
    from gpubackprop.cli import main

    options = ["--hidden", "16", "--epochs", "3", "--no-augment", "--dtype", "float64"]
    options += ["--verbose", "0", "--metrics-json"]
    metrics = tmp_path / "metrics.json"
    command = ["-m", "gpubackprop", "train", "--distributed", "--graph", *options, str(metrics)]
    result = _launch(2, command, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("test accuracy") == 1  # rank 0 alone prints the summary
    distributed = json.loads(metrics.read_text())
    assert distributed["ranks"] == 2
    single_path = tmp_path / "single.json"
    assert main(["train", *options, str(single_path)]) == 0
    single = json.loads(single_path.read_text())
    for key in ("test_loss", "final_train_loss", "final_val_loss", "test_accuracy"):
        np.testing.assert_allclose(distributed[key], single[key], rtol=RTOL, err_msg=key)


def test_bench_data_parallel_row():
    """`gpubackprop bench` row: 1- and 2-rank step times, the all-reduce time and the scaling
    efficiency, with the 2-rank parameters checked against the 1-rank ones."""
    _mpiexec()
    from gpubackprop import benchmarks as bench
    from gpubackprop.benchmarks.report import format_table

    config = bench.BenchConfig(
        backends=["numpy"], preset="tiny", only=("data_parallel",), verbose=False, torch=False
    )
    record = bench.run_benchmarks(config)
    (row,) = record["results"]
    assert row["name"] == "data_parallel.step" and row["status"] == "ok", row["reason"]
    assert row["max_rel_error"] <= row["rtol"]
    assert row["median_s"] == row["step_s_by_ranks"]["2"] > 0
    assert row["step_s_by_ranks"]["1"] > 0 and 0 < row["allreduce_s"]
    expected = row["step_s_by_ranks"]["1"] / (2 * row["step_s_by_ranks"]["2"])
    assert row["scaling_efficiency"] == pytest.approx(expected)
    model = gb.Sequential(gb.Dense(64, 512), gb.Dense(512, 256), gb.Dense(256, 10)).to("numpy")
    assert row["flat_elements"] == model.store.size
    assert "scaling efficiency" in format_table(record)


def test_cli_rank_failing_alone_stops_the_job(tmp_path):
    """One rank's `train --distributed` fails before training (its data file is missing) while
    the other waits for it in fit's first collective: the job ends with the error, no hang."""
    mpiexec = _mpiexec()
    options = ["-m", "gpubackprop", "train", "--distributed", "--hidden", "8", "--verbose", "0"]
    missing = str(tmp_path / "missing.npz")
    command = [mpiexec, "-n", "1", sys.executable, *options, ":"]
    command += ["-n", "1", sys.executable, *options, "--dataset", f"npz:{missing}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env
    )
    assert result.returncode != 0
    assert "missing.npz" in result.stderr
    assert "test accuracy" not in result.stdout


# -- single-process tests -------------------------------------------------------------------------


def test_docs_examples_run_on_one_rank(tmp_path, monkeypatch):
    """docs/distributed.md's scripts, as written, in this process (an MPI job of one rank)."""
    pytest.importorskip("mpi4py")
    page = (ROOT / "docs" / "distributed.md").read_text(encoding="utf-8")
    fit_script, loop_script = re.findall(r"```python\n(.*?)```", page, re.S)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPUBACKPROP_BACKEND", "numpy")
    namespace: dict = {}
    exec(compile(fit_script, "docs/distributed.md", "exec"), namespace)
    assert namespace["history"]["accuracy"][-1] > 0.9
    assert (tmp_path / "model.safetensors").is_file()
    namespace = {}
    exec(compile(loop_script, "docs/distributed.md", "exec"), namespace)
    model, x, y = namespace["model"], namespace["x"], namespace["y"]
    assert model.evaluate(x, y, gb.MSELoss())["loss"] < 0.1 * float(np.var(y))  # it learned


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("rows", [0, 1, 2, 5, 24, 25, 101])
def test_shards_are_disjoint_cover_the_batch_and_differ_by_at_most_one(size, rows):
    start = 13
    bounds = [dist.shard_bounds(start, start + rows, r, size) for r in range(size)]
    assert bounds[0][0] == start and bounds[-1][1] == start + rows
    for (_, hi), (lo, _) in itertools.pairwise(bounds):
        assert hi == lo
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == rows


@pytest.mark.parametrize(
    "local_rank,local_size,count,expected",
    [(0, 1, 1, 0), (0, 4, 8, 0), (3, 4, 8, 3), (3, 4, 4, 3), (2, 4, 1, 0)],
)
def test_one_gpu_per_rank_from_the_node_local_rank(local_rank, local_size, count, expected):
    assert dist.select_device(local_rank, local_size, count) == expected


def test_more_ranks_than_gpus_on_a_node_is_refused():
    with pytest.raises(RuntimeError, match="4 ranks run on this node but only 2 GPUs"):
        dist.select_device(3, 4, 2)
    with pytest.raises(ValueError, match="device_count=0"):
        dist.select_device(0, 1, 0)


def test_too_many_ranks_for_the_gpus_fail_only_a_cupy_model():
    """Ranks training on the CPU need no GPU each; a cupy model on such a rank is refused."""
    group = dist.ProcessGroup(comm=None, rank=5, size=8, local_rank=5, local_size=8)
    group.device_error = "8 ranks run on this node but only 4 GPUs are visible"
    model, opt = _model_and_optimizer("sgd", seed=0)
    numpy_parallel = dist.DataParallel(group, model, gb.MSELoss(), opt)
    assert isinstance(numpy_parallel.transport, dist.MpiTransport)
    on_gpu = types.SimpleNamespace(backend=types.SimpleNamespace(name="cupy"))  # a stand-in
    with pytest.raises(RuntimeError, match="only 4 GPUs are visible"):
        dist.DataParallel(group, on_gpu, gb.MSELoss(), opt)


def test_first_difference_names_the_path():
    a = {"model": {"layers": [{"out_features": 8}, {"type": "Tanh"}]}, "lr": 0.1}
    b = {"model": {"layers": [{"out_features": 8}, {"type": "ReLU"}]}, "lr": 0.1}
    assert dist.first_difference(a, b) == ("model.layers[1].type", "Tanh", "ReLU")
    assert dist.first_difference(a, a) is None
    assert dist.first_difference({"x": [1, 2]}, {"x": [1, 2, 3]}) == ("x length", 2, 3)
    assert dist.first_difference({"x": 1}, {"y": 1}) == ("x", 1, "<missing>")


def test_setup_compares_standardize_buffers():
    """Standardize's mean and std are not broadcast: ranks fitted on other data must differ."""

    def setup(mean):
        model = gb.Sequential(gb.Standardize(mean, [1.0, 2.0]), gb.Dense(2, 3)).to("numpy")
        opt = gb.SGD(model.parameters(), lr=0.1)
        return dist.training_setup(model, opt, gb.MSELoss(), 10, 5)

    where, _, _ = dist.first_difference(setup([0.0, 1.0]), setup([0.0, 1.5]))
    assert where == "buffers.0.mean"
    assert dist.first_difference(setup([0.0, 1.0]), setup([0.0, 1.0])) is None


def test_missing_nccl_names_what_to_install(monkeypatch):
    """CuPy without NCCL (as on this CI machine, or forced with a stand-in module): the
    cupy transport refuses with the pip command; with NCCL present the module comes back."""
    try:
        from cupy.cuda import nccl
    except ImportError:
        pytest.skip("CuPy is not importable")
    if nccl.available:
        assert dist.require_nccl() is nccl
        monkeypatch.setattr(nccl, "available", False)
    with pytest.raises(RuntimeError, match=r'pip install "nvidia-nccl-cu1[23]>=2\.27\.7,<3"'):
        dist.require_nccl()


def test_bench_without_mpi_skips_the_row_and_still_passes(monkeypatch):
    from gpubackprop import benchmarks as bench

    monkeypatch.setitem(sys.modules, "mpi4py", None)
    config = bench.BenchConfig(
        backends=["numpy"], preset="tiny", only=("data_parallel",), verbose=False, torch=False
    )
    record = bench.run_benchmarks(config)
    assert record["results"] == []
    (entry,) = [e for e in record["skipped"] if e["name"] == "data_parallel.step"]
    assert 'pip install ".[mpi]"' in entry["reason"]


def test_missing_mpi4py_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py now raises ImportError
    with pytest.raises(ImportError, match=r"pip install \"gpubackprop\[mpi\]\""):
        dist._import_mpi()


def test_info_reports_what_distributed_training_can_use(capsys):
    from gpubackprop.cli import main

    assert main(["info", "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)["distributed"]
    assert entry["mpi4py"] == pytest.importorskip("mpi4py").__version__
    assert entry["mpiexec"] == _mpiexec() and entry["mpi_hint"] is None
    nccl_loads = "available"
    try:
        dist.require_nccl()
    except RuntimeError as error:
        nccl_loads = f"unavailable: {error}"
    assert entry["nccl"] == nccl_loads
    assert main(["info"]) == 0
    assert f"distributed: mpi4py {entry['mpi4py']}" in capsys.readouterr().out


def test_nccl_hint_follows_the_cuda_major():
    assert "nvidia-nccl-cu12" in dist.nccl_install_hint(12)
    assert "nvidia-nccl-cu13" in dist.nccl_install_hint(13)


def test_one_rank_fit_distributed_equals_fit():
    """A one-process job (no mpiexec: MPI's singleton) trains exactly as without it."""
    pytest.importorskip("mpi4py")
    single, history = _fit_run(distributed=False)
    one_rank, one_history = _fit_run(distributed=True)
    assert np.array_equal(single, one_rank)
    assert one_history["loss"] == history["loss"]


def _cupy_with_nccl() -> None:
    """Skip without a GPU or NCCL; on the GPU check (GPUBACKPROP_REQUIRE_GPU) fail instead,
    with the reason (for NCCL: the pip command that brings it) as the whole message."""
    required = bool(os.environ.get("GPUBACKPROP_REQUIRE_GPU"))
    available, reason = gb.available_backends()["cupy"]
    if not available and required:
        pytest.fail(f"GPUBACKPROP_REQUIRE_GPU is set but cupy is unavailable: {reason}")
    if not available:
        pytest.skip(f"backend 'cupy' is unavailable here: {reason}")
    try:
        dist.require_nccl()
    except RuntimeError as error:
        if required:
            pytest.fail(f"NCCL is missing on this GPU machine: {error}", pytrace=False)
        pytest.skip(str(error))


class _OneRankComm:
    """MPI's collectives in a world of one rank (identities), so that a one-rank GPU test
    needs no MPI: the GPU machine may lack the mpi extra."""

    @staticmethod
    def allgather(value):
        return [value]

    @staticmethod
    def bcast(value, root=0):
        return value


@pytest.mark.gpu
def test_nccl_one_rank_allreduce_and_broadcast_on_the_gpu():
    """A one-rank NCCL communicator: the all-reduce (sum) of one rank is the buffer itself,
    the broadcast from rank 0 leaves it; both in place on the current stream."""
    _cupy_with_nccl()
    import cupy

    # a one-rank group needs no MPI (the GPU machine may lack the mpi extra)
    group = dist.ProcessGroup(comm=None, rank=0, size=1, local_rank=0, local_size=1)
    transport = dist.NcclTransport(group)
    for dtype in (np.float32, np.float64):
        host = np.random.default_rng(0).standard_normal(1000 * 64 + 17).astype(dtype)
        flat = cupy.asarray(host)
        transport.allreduce_sum_(flat)
        transport.broadcast_(flat)
        transport.synchronize()
        assert np.array_equal(flat.get(), host)
    model, opt = _model_and_optimizer("adam", seed=0)
    model.to("cupy", dtype="float32")
    parallel = dist.DataParallel(group, model, gb.SoftmaxCrossEntropyLoss(), opt)
    assert isinstance(parallel.transport, dist.NcclTransport)


@pytest.mark.gpu
def test_nccl_captured_step_is_bitwise_the_eager_one_on_the_gpu():
    """One rank on cupy: compile_step(data_parallel=) captures forward, loss, backward, the
    NCCL all-reduce and clipping + Adam as ONE CUDA graph (NcclTransport is capturable); 5 steps
    give bitwise the parameters of the eager data-parallel loop."""
    _cupy_with_nccl()
    group = dist.ProcessGroup(comm=_OneRankComm(), rank=0, size=1, local_rank=0, local_size=1)
    steps = 5
    eager = _train_steps("adam", 0.05, 24, group, backend="cupy", steps=steps)
    captured: dict = {}
    compiled = _train_steps("adam", 0.05, 24, group, backend="cupy", steps=steps, compiled=captured)
    assert captured == {"graphs_per_step": 1, "graphs": 1}
    for step in range(steps):
        assert np.array_equal(compiled[step], eager[step]), step
    assert np.max(np.abs(eager[-1] - eager[0])) > 1e-4  # it trained


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
