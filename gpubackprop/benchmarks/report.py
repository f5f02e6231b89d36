"""Output: the table (plain text or markdown), the JSON record (written atomically) and the
throughput plot.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .data_parallel import notes as data_parallel_notes
from .machine import source_root
from .timing import format_time


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "device"


def shape_text(shape: dict[str, Any]) -> str:
    if "layers" in shape:
        return f"b={shape['batch']}"
    if "M" in shape:
        return f"{shape['M']}x{shape['N']}x{shape['K']}"
    return "x".join(str(v) for v in shape.values())


BASELINE_ORDER = ("cublas", "torch", "torch_compile", "torch_fused")


def legend(baselines: list[str]) -> list[str]:
    """What the derived columns of the tables mean, printed under them."""
    lines = [
        "of floor: the floor (the row's FLOPs at the measured GEMM ceiling, or its bytes at the "
        "measured copy bandwidth, whichever takes longer) divided by our median time; 100% runs "
        "at the ceiling. Above 100% the row beat the ceilings: its data stayed in cache (the copy "
        "ceiling streams arrays larger than the caches) or the ceiling's own run was slowed.",
    ]
    if baselines:
        lines.append(
            "vs <baseline>: the baseline's median time divided by ours: above 1.00x we are "
            "faster, below it slower (" + ", ".join(baselines) + ")."
        )
    return lines


def format_table(record: dict[str, Any]) -> str:
    """The rows as a text table; ratios are baseline_time / our_time (>1: we are faster)."""
    rows = record["results"]
    names = [b for b in BASELINE_ORDER if any(b in r["vs"] for r in rows)]
    # Host rows (host.*) record their kernel launches: the host time per launch is the goal.
    launches = any(r.get("launches") for r in rows)
    header = (
        ["op", "backend", "shape", "median", "TFLOP/s", "GB/s", "floor", "of floor", "max rel err"]
        + (["launches", "per launch"] if launches else [])
        + [f"vs {b}" for b in names]
        + ["status"]
    )
    lines = [header]
    for r in rows:
        line = [
            r["name"],
            r["backend"],
            shape_text(r["shape"]),
            format_time(r["median_s"]),
            f"{r['tflops']:.3f}" if r["tflops"] else "-",
            f"{r['gbps']:.1f}" if r["gbps"] else "-",
            format_time(r["floor_s"]),
            f"{100 * r['floor_fraction']:.0f}%" if r["floor_fraction"] else "-",
            f"{r['max_rel_error']:.1e}" if r["max_rel_error"] is not None else "-",
        ]
        if launches:
            count = r.get("launches")
            per = r["median_s"] / count if count and r["median_s"] else None
            line += [str(count) if count else "-", format_time(per)]
        line += [f"{r['vs'][b]:.2f}x" if r["vs"].get(b) else "-" for b in names]
        line.append(r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason'][:60]}")
        lines.append(line)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    notes = legend(names)
    for backend, ceiling in record["ceilings"].items():
        if "gemm_tflops" in ceiling:
            notes.append(
                f"ceilings [{backend}]: GEMM {ceiling['gemm_tflops']:.2f} TFLOP/s "
                f"({ceiling['gemm_size']}^3), copy {ceiling['copy_gbps']:.1f} GB/s"
            )
    threads = record.get("threads", {})
    if threads:
        notes.append(f"threads: numpy {threads.get('numpy')}, torch {threads.get('torch')}")
    for entry in record["skipped"]:
        notes.append(f"skipped [{entry['backend']}] {entry['name']}: {entry['reason']}")
    notes += data_parallel_notes(rows)
    return "\n".join([*out, "", *notes])


def format_markdown(record: dict[str, Any]) -> str:
    """The rows as a markdown table, for the README."""
    rows = record["results"]
    names = [b for b in BASELINE_ORDER if any(b in r["vs"] for r in rows)]
    head = ["op", "backend", "shape", "median", "TFLOP/s or GB/s", "of floor", "max rel err"]
    head += [f"vs {b}" for b in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        rate = (
            f"{r['tflops']:.3f} TFLOP/s"
            if r["bound"] == "compute" and r["tflops"]
            else f"{r['gbps']:.1f} GB/s"
            if r["gbps"]
            else "-"
        )
        cells = [
            f"`{r['name']}`",
            r["backend"],
            shape_text(r["shape"]),
            format_time(r["median_s"]) if r["status"] == "ok" else r["status"],
            rate if r["status"] == "ok" else "-",
            f"{100 * r['floor_fraction']:.0f}%" if r["floor_fraction"] else "-",
            f"{r['max_rel_error']:.1e}" if r["max_rel_error"] is not None else "-",
        ]
        cells += [f"{r['vs'][b]:.2f}x" if r["vs"].get(b) else "-" for b in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", *legend(names)])


def _numpy_to_json(value: Any) -> Any:
    """json.dumps' fallback: NumPy scalars and arrays as Python numbers and lists."""
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _nonfinite_as_strings(value: Any) -> Any:
    """JSON has no inf/NaN: write them as strings so the file stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _nonfinite_as_strings(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nonfinite_as_strings(v) for v in value]
    return value


def write_json(record: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``record`` as standard JSON to ``path`` atomically (a temporary file, renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(
        json.dumps(_nonfinite_as_strings(record), indent=1, default=_numpy_to_json) + "\n"
    )
    os.replace(tmp, path)
    return path


def default_results_dir() -> Path:
    root = source_root()
    return (root if root is not None else Path.cwd()) / "bench" / "results"


def results_path(record: dict[str, Any], directory: str | os.PathLike) -> Path:
    """<date>_<device>_<short commit>.json under ``directory``; _2, _3, ... if taken."""
    date = record["timestamp"][:10]
    devices = record["devices"]
    main_device = devices.get("cupy") or next(iter(devices.values()), {"name": "none"})
    device = _slug(str(main_device.get("name", "device")))
    commit = (record.get("git_commit") or "nocommit")[:8]
    if record.get("git_dirty"):
        commit += "-dirty"
    directory = Path(directory)
    path = directory / f"{date}_{device}_{commit}.json"
    counter = 2
    while path.exists():
        path = directory / f"{date}_{device}_{commit}_{counter}.json"
        counter += 1
    return path


def write_plot(record: dict[str, Any], path: str | os.PathLike) -> Path | None:
    """Throughput against size: TFLOP/s against FLOPs for compute-bound rows, GB/s against
    bytes for memory-bound ones, one line per op and backend (baselines dashed), ceilings as
    horizontal lines.  Returns None (with a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as error:
        print(
            f"--plot skipped: matplotlib is not usable ({type(error).__name__}: {error}); "
            "install gpubackprop[plot]",
            file=sys.stderr,
        )
        return None
    rows = [r for r in record["results"] if r["status"] == "ok" and r["median_s"]]
    fig, axes = plt.subplots(1, 2, figsize=(16, 10))
    panels = (
        ("compute", "flops", 1e12, "TFLOP/s", "FLOPs per call"),
        ("memory", "bytes", 1e9, "GB/s", "bytes moved per call"),
    )
    for ax, (bound, work_key, unit, ylabel, xlabel) in zip(axes, panels):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if r["bound"] != bound or not r[work_key]:
                continue
            family = r["name"].split("@")[0] if "train_step" not in r["name"] else "train_step"
            key = f"{family} [{r['backend']}]"
            series.setdefault(key, []).append((r[work_key], r[work_key] / r["median_s"] / unit))
            device = record["devices"].get(r["backend"], {}).get("class", r["backend"])
            for base, stat in r["baselines"].items():
                bkey = f"{family} [{base} on {device}]"
                series.setdefault(bkey, []).append(
                    (r[work_key], r[work_key] / stat["median_s"] / unit)
                )
        for key, points in sorted(series.items()):
            points.sort()
            style = "--" if " on " in key else "-"
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                style,
                marker="o",
                markersize=3,
                label=key,
                linewidth=1,
            )
        for backend, ceiling in record["ceilings"].items():
            value = ceiling.get("gemm_tflops" if bound == "compute" else "copy_gbps")
            if value:
                ax.axhline(value, color="gray", linestyle=":", linewidth=1)
                ax.annotate(
                    f"{backend} ceiling {value:.3g} {ylabel}",
                    (0.01, value),
                    xycoords=("axes fraction", "data"),
                    fontsize=7,
                    color="gray",
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{bound}-bound rows")
        if series:
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(0.0, -0.1), ncol=2)
        ax.grid(True, which="both", alpha=0.3)
    devices = ", ".join(f"{k}: {v.get('name')}" for k, v in record["devices"].items())
    fig.suptitle(f"gpubackprop bench {record['timestamp']} ({devices})", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
