"""``gpubackprop bench``: its command-line options and the run they start."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import RTOL, SIZES, BenchConfig
from .report import (
    default_results_dir,
    format_markdown,
    format_table,
    results_path,
    write_json,
    write_plot,
)
from .run import run_benchmarks

DESCRIPTION = "throughput benchmarks against cuBLAS, PyTorch and the hardware floor"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``gpubackprop bench``."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a representative subset (< 5 min on one H100, ~2 min on 2 CPU "
        "cores); what bench/device_check.sh runs",
    )
    parser.add_argument(
        "--backend",
        action="append",
        default=None,
        metavar="NAME",
        help="numpy, cupy or emu; repeat or comma-separate for several "
        "(default: cupy and numpy, those available; emu only when named)",
    )
    parser.add_argument("--json", metavar="PATH", help="write the JSON record to PATH")
    parser.add_argument(
        "--append-results",
        action="store_true",
        help="also write the record to bench/results/<date>_<device>_<commit>.json",
    )
    parser.add_argument(
        "--results-dir",
        metavar="DIR",
        default=None,
        help="where --append-results writes (default: bench/results of the "
        "source checkout, else ./bench/results)",
    )
    parser.add_argument("--plot", metavar="PATH", help="draw throughput against size to a PNG")
    parser.add_argument("--dtype", default="float32", choices=tuple(RTOL))
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="run only rows whose name contains TEXT (repeatable)",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch baselines")
    parser.add_argument(
        "--torch-compile",
        default="auto",
        choices=("auto", "on", "off"),
        help="torch.compile baselines (auto: training steps, and elementwise "
        "ops on a GPU without --quick; never on the CPU with --quick)",
    )
    parser.add_argument(
        "--markdown", action="store_true", help="print the table as markdown (for the README)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def split_backends(values: Sequence[str] | None) -> list[str] | None:
    if not values:
        return None
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``gpubackprop bench`` with parsed arguments.  Returns the exit status: 0 when rows
    ran and every one passed its correctness check, 1 otherwise, 2 for a bad option value."""
    config = BenchConfig(
        backends=split_backends(args.backend),
        quick=args.quick,
        dtype=args.dtype,
        only=tuple(args.only),
        torch=not args.no_torch,
        torch_compile=args.torch_compile,
        verbose=not args.quiet,
        preset=getattr(args, "preset", None),
        on_row=(lambda record: write_json(record, args.json)) if args.json else None,
    )
    try:
        record = run_benchmarks(config)
    except ValueError as error:
        print(f"gpubackprop bench: {error}", file=sys.stderr)
        return 2
    print(format_markdown(record) if args.markdown else format_table(record))
    if args.json:
        print(f"wrote {write_json(record, args.json)}")
    if args.append_results:
        directory = Path(args.results_dir) if args.results_dir else default_results_dir()
        print(f"wrote {write_json(record, results_path(record, directory))}")
    if args.plot:
        written = write_plot(record, args.plot)
        if written is not None:
            print(f"wrote {written}")
    bad = [r for r in record["results"] if r["status"] != "ok"]
    if not record["results"]:
        print(
            "gpubackprop bench: no row ran (no backend available, or --only matched nothing)",
            file=sys.stderr,
        )
    # Nothing measured is a failure too: bench/device_check.sh must not report a GPU whose
    # backend could not start as a passed benchmark step.
    return 1 if bad or not record["results"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpubackprop bench", description=DESCRIPTION)
    add_arguments(parser)
    parser.add_argument("--preset", default=None, choices=tuple(SIZES), help=argparse.SUPPRESS)
    return run_from_args(parser.parse_args(argv))
