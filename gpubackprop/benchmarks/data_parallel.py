"""The ``data_parallel.*`` rows: what data-parallel training (gpubackprop/distributed.py) costs.

``data_parallel.step`` (numpy): the training step of one global batch on 1 and on 2 CPU ranks
(``mpiexec -n 1`` and ``-n 2``, one BLAS thread a rank, so 2 ranks use twice the cores), the
MPI all-reduce of the flat gradient buffer alone, and the scaling efficiency
t₁ / (N · t_N): 1 when N ranks take 1/N of the time.  Its check: the 2-rank parameters after
the timed steps against the 1-rank ones.

``data_parallel.nccl_allreduce`` (cupy): a one-rank NCCL all-reduce of a flat buffer of the
same size, in place on the current stream, against its floor, a device-to-device copy of the
buffer (what a one-rank all-reduce may do at most).  It needs no MPI.

Self-contained: the rows are built here and appended to the record by run.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .cases import max_rel_error
from .config import blank_row
from .timing import format_time

ROW_STEP = "data_parallel.step"
ROW_NCCL = "data_parallel.nccl_allreduce"
# A 64-512-256-10 MLP (the `gpubackprop train` default): 165 k parameters, 0.66 MB in float32.
DP_MLP = (64, 512, 256, 10)
DP_BATCH = 256
DP_STEPS = {"tiny": 3, "quick": 15, "full": 40}
WARMUP_STEPS = 3
RANKS = (1, 2)
WORKER_TIMEOUT_S = 120


class Unavailable(Exception):
    """This machine cannot run the row (no MPI, no NCCL): recorded under "skipped", which
    is not a failure of the benchmark run."""


def wanted(only: Any, backend: str, backends: Any) -> list[str]:
    """The data-parallel rows this run asks for: by backend (default: all) and --only."""
    rows = {"numpy": ROW_STEP, "cupy": ROW_NCCL}
    names = list(backends) if backends else ["cupy", "numpy"]
    chosen = [rows[b] for b in names if b in rows and b == backend]
    return [r for r in chosen if not only or any(text in r for text in only)]


def _row(name: str, backend: str, dtype: str, shape: dict[str, Any]) -> dict[str, Any]:
    """A row with the fields every row of the record has."""
    return blank_row(name, backend, shape, dtype)


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.is_file() else shutil.which("mpiexec")


def step_row(dtype: str, steps: int) -> dict[str, Any]:
    """Run the worker under mpiexec -n 1 and -n 2 and build the data_parallel.step row."""
    shape = {"mlp": "-".join(map(str, DP_MLP)), "batch": DP_BATCH, "ranks": "1,2"}
    row = _row(ROW_STEP, "numpy", dtype, shape)
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        raise Unavailable('needs mpi4py and mpiexec: pip install ".[mpi]"') from None
    launcher = _mpiexec()
    if launcher is None:
        raise Unavailable('no mpiexec next to the interpreter or on PATH: pip install ".[mpi]"')
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for ranks in RANKS:
            out = Path(folder) / f"ranks{ranks}"
            env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
            env["MKL_NUM_THREADS"] = "1"
            command = [launcher, "-n", str(ranks), sys.executable, "-m", __name__]
            command += ["--dtype", dtype, "--steps", str(steps), "--out", str(out)]
            try:
                done = subprocess.run(
                    command, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, env=env
                )
            except subprocess.TimeoutExpired:
                row.update(status="error", reason=f"{ranks} ranks: over {WORKER_TIMEOUT_S} s")
                return row
            if done.returncode != 0:
                row.update(status="error", reason=f"{ranks} ranks: {done.stderr.strip()[-400:]}")
                return row
            results[ranks] = json.loads(out.with_suffix(".json").read_text())
            results[ranks]["params"] = np.load(out.with_suffix(".npy"))
    one, two = results[1], results[2]
    row["median_s"] = two["step_s"]
    row["q1_s"], row["q3_s"] = two["step_q1_s"], two["step_q3_s"]
    row["calls"] = steps
    flat_bytes = two["flat_elements"] * np.dtype(dtype).itemsize
    row["bytes"] = flat_bytes
    row["step_s_by_ranks"] = {"1": one["step_s"], "2": two["step_s"]}
    row["allreduce_s"] = two["allreduce_s"]
    row["allreduce_fraction"] = two["allreduce_s"] / two["step_s"]
    row["scaling_efficiency"] = one["step_s"] / (2 * two["step_s"])
    row["flat_elements"] = two["flat_elements"]
    row["max_rel_error"] = max_rel_error([two["params"]], [one["params"]])
    if row["max_rel_error"] > row["rtol"]:
        row.update(status="mismatch", reason="2 ranks and 1 rank trained to other parameters")
    return row


def _worker(dtype: str, steps: int, out: Path) -> None:
    """One rank of the timed run: WARMUP_STEPS + steps steps on consecutive global batches."""
    import gpubackprop as gb
    from gpubackprop import distributed as dist

    group = dist.init()
    gb.seed(0)
    layers = []
    for width_in, width_out in itertools.pairwise(DP_MLP[:-1]):
        layers += [gb.Dense(width_in, width_out), gb.ReLU()]
    model = gb.Sequential(*layers, gb.Dense(DP_MLP[-2], DP_MLP[-1])).to("numpy", dtype=dtype)
    optimizer = gb.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss = gb.SoftmaxCrossEntropyLoss().to(model.backend)
    rng = np.random.default_rng(1)
    total = WARMUP_STEPS + steps
    x = rng.standard_normal((total * DP_BATCH, DP_MLP[0])).astype(dtype)
    y = rng.integers(0, DP_MLP[-1], size=total * DP_BATCH)
    parallel = dist.DataParallel(group, model, loss, optimizer)
    parallel.start(dist.training_setup(model, optimizer, loss, len(x), DP_BATCH))
    step_times = []
    for step in range(total):
        start, stop = step * DP_BATCH, (step + 1) * DP_BATCH
        lo, hi = parallel.shard(start, stop)
        group.comm.Barrier()  # every rank starts the step together: the slowest one counts
        began = time.perf_counter()
        pred = model.forward(x[lo:hi])
        loss.forward(pred, y[lo:hi])
        model.backward(loss.backward(), need_input_grad=False)
        parallel.average_gradients(hi - lo, stop - start)
        optimizer.step()
        elapsed = group.allreduce_host([time.perf_counter() - began], op="max")[0]
        if step >= WARMUP_STEPS:
            step_times.append(float(elapsed))
    # The all-reduce alone, on the real gradient buffer (its values no longer matter).
    reduce_times = []
    for _ in range(steps):
        group.comm.Barrier()
        began = time.perf_counter()
        parallel.transport.allreduce_sum_(model.store.grad)
        reduce_times.append(time.perf_counter() - began)
    reduce_s = group.allreduce_host([statistics.median(reduce_times)], op="max")[0]
    if group.is_main:
        q1, _, q3 = statistics.quantiles(step_times, n=4)
        summary = {
            "ranks": group.size,
            "step_s": statistics.median(step_times),
            "step_q1_s": q1,
            "step_q3_s": q3,
            "allreduce_s": float(reduce_s),
            "flat_elements": int(model.store.size),
        }
        out.with_suffix(".json").write_text(json.dumps(summary))
        np.save(out.with_suffix(".npy"), np.array(model.store.data))


def nccl_row(dtype: str, steps: int) -> dict[str, Any]:
    """A one-rank NCCL all-reduce of the flat buffer of DP_MLP against a device copy."""
    from gpubackprop import distributed as dist

    elements = _flat_elements()
    row = _row(ROW_NCCL, "cupy", dtype, {"elements": elements, "ranks": 1})
    try:
        import cupy

        group = dist.ProcessGroup(comm=None, rank=0, size=1, local_rank=0, local_size=1)
        transport = dist.NcclTransport(group)
    except Exception as error:
        raise Unavailable(f"{type(error).__name__}: {str(error)[:300]}") from error
    host = np.random.default_rng(0).standard_normal(elements).astype(dtype)
    flat = cupy.asarray(host)
    copy = cupy.empty_like(flat)
    start, end = cupy.cuda.Event(), cupy.cuda.Event()

    def timed(call, repeats: int) -> list[float]:
        for _ in range(5):
            call()
        times = []
        for _ in range(repeats):
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
        return times

    repeats = 10 * steps
    reduce_times = timed(lambda: transport.allreduce_sum_(flat), repeats)
    copy_times = timed(lambda: copy.__setitem__(Ellipsis, flat), repeats)
    median = statistics.median(reduce_times)
    q1, _, q3 = statistics.quantiles(reduce_times, n=4)
    moved = 2 * flat.nbytes  # read and write the buffer once
    row.update(median_s=median, q1_s=q1, q3_s=q3, calls=repeats, bytes=moved)
    row["gbps"] = moved / median / 1e9
    row["floor_s"] = statistics.median(copy_times)
    row["floor_fraction"] = row["floor_s"] / median
    row["max_rel_error"] = max_rel_error([flat.get()], [host])  # one rank's sum is itself
    if row["max_rel_error"] != 0:
        row.update(status="mismatch", reason="a one-rank all-reduce changed the buffer")
    return row


def _flat_elements() -> int:
    import gpubackprop as gb

    layers = []
    for width_in, width_out in itertools.pairwise(DP_MLP):
        layers.append(gb.Dense(width_in, width_out))
    return int(gb.Sequential(*layers).to("numpy").store.size)


def append_rows(config: Any, record: dict[str, Any], backend: str) -> None:
    """Append the data-parallel rows of ``backend`` that ``config`` asks for to ``record``
    (with the tests' "tiny" preset only when --only names them: each starts MPI jobs)."""
    if config.preset == "tiny" and not any("data_parallel" in text for text in config.only):
        return
    for name in wanted(config.only, backend, config.backends):
        build = step_row if name == ROW_STEP else nccl_row
        preset = "tiny" if config.preset == "tiny" else "quick" if config.quick else "full"
        try:
            row = build(np.dtype(config.dtype).name, DP_STEPS[preset])
        except Unavailable as why:
            record["skipped"].append({"backend": backend, "name": name, "reason": str(why)})
            if config.verbose:
                print(f"[{backend}] {name}: skipped: {why}", file=sys.stderr)
            continue
        record["results"].append(row)
        if config.verbose:
            print(f"[{backend}] {name}: {row['status']} {row['reason']}", file=sys.stderr)
        if config.on_row is not None:
            config.on_row(record)


def notes(rows: list[dict[str, Any]]) -> list[str]:
    """The table's lines for the figures a data-parallel row has beyond the common columns."""
    lines = []
    for r in rows:
        if r["name"] == ROW_STEP and r["status"] == "ok":
            by_ranks = r["step_s_by_ranks"]
            lines.append(
                f"{ROW_STEP}: step {format_time(by_ranks['1'])} on 1 rank, "
                f"{format_time(by_ranks['2'])} on 2 ranks; all-reduce of the flat gradients "
                f"({r['flat_elements']} elements) {format_time(r['allreduce_s'])} "
                f"({100 * r['allreduce_fraction']:.0f}% of the step); scaling efficiency "
                f"{100 * r['scaling_efficiency']:.0f}%"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one rank of the data_parallel.step row")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=DP_STEPS["quick"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    _worker(args.dtype, args.steps, args.out)


if __name__ == "__main__":
    main()
