"""The ``gpubackprop`` command: train, info, gradcheck, parity and bench.

Each subcommand is a function registered in ``SUBCOMMANDS`` with the function that adds its
options; ``main`` builds one argparse sub-parser per entry.  Adding a subcommand is one
``@subcommand(...)`` decorator, nothing else.

Exit status: 0 success, 1 a check failed or the run failed, 2 a usage error (a bad option
value, a missing file) with a one-line message saying what was wrong.  Set GPUBACKPROP_DEBUG=1
to get the full traceback instead of the one-line message.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .backends import BACKEND_NAMES, DEVICE_BACKENDS
from .backends.base import ACTIVATIONS
from .checks import check_int, check_number, describe_range
from .dtypes import DTYPES
from .layers import activation_layer
from .precision import PRECISIONS

# The CLI's order: "identity" last, so that `gradcheck --activation all` starts with ReLU.
CLI_ACTIVATIONS = (*(name for name in ACTIVATIONS if name != "identity"), "identity")

__all__ = ["SUBCOMMANDS", "TRAIN_DEFAULTS", "main", "subcommand"]

PROG = "gpubackprop"


# -- the subcommand table ------------------------------------------------------------------------


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], Any]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], Any]):
    """Register ``run(args) -> exit status`` as ``gpubackprop <name>``."""

    def register(run: Callable[[argparse.Namespace], int]):
        SUBCOMMANDS[name] = Subcommand(name, help, add_arguments, run)
        return run

    return register


class UsageError(ValueError):
    """A problem with what the user asked for; reported in one line with exit status 2."""


# -- option types: each names the value and what is accepted -------------------------------------


def _number(
    kind: type, low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False
) -> Callable[[str], Any]:
    """An argparse type: the text as ``kind``, accepted by checks.check_int / check_number."""
    what = describe_range(kind, low, high, low_open, high_open)

    def parse(text: str):
        try:
            value = kind(text)
            if kind is int:
                return check_int("value", value, int(low) + int(low_open), high)
            return check_number("value", value, low, high, low_open=low_open, high_open=high_open)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None

    parse.__name__ = what  # argparse shows it in "invalid <name> value"
    return parse


positive_int = _number(int, 1)
non_negative_int = _number(int, 0)
positive_float = _number(float, 0.0, low_open=True)
non_negative_float = _number(float, 0.0)
momentum_value = _number(float, 0.0, 1.0, high_open=True)
val_fraction_value = _number(float, 0.0, 1.0, high_open=True)


def hidden_sizes(text: str) -> tuple[int, ...]:
    """ "512,256" → (512, 256); "" or "none" → () (a linear model)."""
    cleaned = str(text).strip().lower()
    if cleaned in ("", "none", "[]"):
        return ()
    sizes = []
    for part in cleaned.strip("[]()").split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a list of layer widths; expected positive integers separated "
                "by commas, e.g. 512,256 (or 'none' for no hidden layer)"
            )
        sizes.append(int(part))
    return tuple(sizes)


OPTIMIZER_NAMES = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")

# Defaults of `gpubackprop train`, chosen on the digits data set (stratified 80/20 split, data
# seed 0, 10% of the training part held out for validation): the test accuracy is 0.978-0.989
# over training seeds 0-5, in a few seconds on 2 CPU cores.  Without the one-pixel shift
# augmentation, MLPs of 256-128 or 512-256 units reach only 0.966-0.978 on this split (the
# hardest of six splits tried; others give about 0.98), with or without a cosine schedule.
TRAIN_DEFAULTS: dict[str, Any] = {
    "dataset": "digits",
    "hidden": "512,256",
    "activation": "relu",
    "model": None,  # a JSON model config instead of hidden/activation
    "optimizer": "adam",
    "lr": None,  # per optimizer: OPTIMIZER_DEFAULTS
    "momentum": None,
    "weight_decay": None,
    "epochs": 15,
    "batch_size": 64,
    "schedule": "cosine",
    "val_fraction": 0.1,
    "augment": None,  # digits: on; other data sets: not available
    "seed": 0,
    "data_seed": 0,
    "backend": None,  # GPUBACKPROP_BACKEND or "auto"
    "dtype": "float32",
    "precision": "fp32",
    "save": None,
    "export_onnx": None,
    "metrics_json": None,
    "plot": None,
    "verbose": 1,
    "graph": False,
    "distributed": False,
    "max_norm": None,
}
OPTIMIZER_DEFAULTS = {
    "sgd": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0},
    "adam": {"lr": 1e-3, "weight_decay": 0.0},
    "adamw": {"lr": 1e-3, "weight_decay": 1e-2},
}


# -- train ----------------------------------------------------------------------------------------


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    d = TRAIN_DEFAULTS
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        default=d["dataset"],
        metavar="NAME",
        help="digits (embedded, default), spirals, regression, npz:PATH or mnist:DIR",
    )
    data.add_argument(
        "--val-fraction",
        type=val_fraction_value,
        default=d["val_fraction"],
        help="share of the training data held out for validation "
        f"(default {d['val_fraction']}; 0 for none)",
    )
    data.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=d["augment"],
        help="add one-pixel shifts of the training images (digits only; default on for digits)",
    )
    data.add_argument(
        "--data-seed",
        type=non_negative_int,
        default=d["data_seed"],
        help="seed of the train/validation/test split (default 0)",
    )
    model = parser.add_argument_group("model")
    # --hidden and --activation default to None so that --model can tell they were not given.
    model.add_argument(
        "--hidden",
        type=hidden_sizes,
        default=None,
        metavar="W1,W2,...",
        help=f"hidden layer widths (default {d['hidden']}; 'none' for none)",
    )
    model.add_argument(
        "--activation",
        choices=CLI_ACTIVATIONS,
        default=None,
        help=f"hidden activation (default {d['activation']})",
    )
    model.add_argument(
        "--model",
        metavar="JSON",
        default=d["model"],
        help="train the network a JSON model config describes (the format of "
        "gb.Sequential.config(), read by gb.Sequential.from_config) instead of --hidden and "
        "--activation",
    )
    optimization = parser.add_argument_group("optimization")
    optimization.add_argument(
        "--optimizer",
        choices=OPTIMIZER_NAMES,
        default=d["optimizer"],
        help=f"(default {d['optimizer']})",
    )
    optimization.add_argument(
        "--lr",
        type=positive_float,
        default=d["lr"],
        help="learning rate (default: sgd 0.05, adam and adamw 1e-3)",
    )
    optimization.add_argument(
        "--momentum",
        type=momentum_value,
        default=d["momentum"],
        help="SGD momentum (default 0.9; sgd only)",
    )
    optimization.add_argument(
        "--weight-decay",
        type=non_negative_float,
        default=d["weight_decay"],
        help="L2 penalty (sgd, adam) or decoupled decay (adamw; default 1e-2); default 0",
    )
    optimization.add_argument(
        "--max-norm",
        type=positive_float,
        default=d["max_norm"],
        help="clip the gradients' global L2 norm to this before each update (gb.clip_grad_norm "
        "semantics, applied inside the optimizer launch); default: no clipping",
    )
    optimization.add_argument(
        "--epochs", type=positive_int, default=d["epochs"], help=f"(default {d['epochs']})"
    )
    optimization.add_argument(
        "--batch-size",
        type=positive_int,
        default=d["batch_size"],
        help=f"(default {d['batch_size']})",
    )
    optimization.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=d["schedule"],
        help="learning-rate schedule over the epochs: constant, or "
        "cosine decay to 0 (default cosine)",
    )
    optimization.add_argument(
        "--seed",
        type=non_negative_int,
        default=d["seed"],
        help="seed of the weight initialisation and shuffling (default 0)",
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--backend",
        choices=BACKEND_NAMES,
        default=d["backend"],
        help="default: the GPUBACKPROP_BACKEND variable, else auto (cupy when a "
        "GPU is usable, else numpy)",
    )
    run.add_argument("--dtype", choices=DTYPES, default=d["dtype"], help=f"(default {d['dtype']})")
    run.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=d["precision"],
        help="the dense layers' matrix products: fp32, or tf32 / bf16 operands with fp32 "
        "accumulation and fp32 master weights (tensor cores: a GPU of compute capability 8.0+; "
        f"float32 only) (default {d['precision']})",
    )
    run.add_argument(
        "--config",
        metavar="JSON",
        help="a JSON file whose keys are any of these options (e.g. "
        '{"epochs": 5, "hidden": [64, 32]}); flags on the command line '
        "override it",
    )
    run.add_argument(
        "--graph",
        action="store_true",
        default=d["graph"],
        help="train with the whole step captured as one CUDA graph per batch shape "
        "(gb.compile_step; on numpy the same step runs eagerly; with --distributed the NCCL "
        "all-reduce is inside the graph, MPI's runs between two graphs: docs/graphs.md)",
    )
    run.add_argument("--save", metavar="PATH", help="write a checkpoint (model and optimizer)")
    run.add_argument(
        "--export-onnx",
        metavar="PATH",
        help="write the trained model as ONNX (needs the onnx package: extra 'onnx')",
    )
    run.add_argument("--metrics-json", metavar="PATH", help="write the final metrics as JSON")
    run.add_argument(
        "--plot", metavar="PATH", help="draw loss and accuracy curves to a PNG (needs matplotlib)"
    )
    run.add_argument(
        "--verbose",
        type=int,
        choices=(0, 1, 2),
        default=d["verbose"],
        help="0 the summary only, 1 a progress bar (default), 2 a line per epoch",
    )
    run.add_argument(
        "--distributed",
        action=argparse.BooleanOptionalAction,
        default=d["distributed"],
        help="data-parallel over the ranks of mpiexec -n N / srun (needs gpubackprop[mpi]); "
        "--batch-size is the global batch; rank 0 prints and writes the outputs "
        "(docs/distributed.md)",
    )


def _config_to_argv(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """The options in a --config JSON file as command-line tokens, so that they go through
    the same parsing and validation as flags, and flags given after them win."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--config file {path!r} does not exist") from None
    except UnicodeDecodeError as error:
        raise UsageError(
            f"--config file {path!r} is not UTF-8 text (byte {error.object[error.start]:#04x} at "
            f"offset {error.start}); expected a JSON file"
        ) from None
    except OSError as error:
        raise UsageError(f"--config file {path!r} cannot be read: {error}") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"--config file {path!r} is not valid JSON: {error}") from None
    except RecursionError:
        raise UsageError(
            f"--config file {path!r} nests JSON too deeply; expected an object of option names "
            "and values"
        ) from None
    if not isinstance(config, dict):
        raise UsageError(
            f"--config file {path!r} holds a {type(config).__name__}; expected a JSON object "
            "of option names and values"
        )
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    tokens: list[str] = []
    for key, value in config.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in actions or dest == "config":
            valid = sorted(k for k in actions if k != "config")
            raise UsageError(f"--config file {path!r} has unknown option {key!r}; valid: {valid}")
        action = actions[dest]
        flag = action.option_strings[0]
        if value is None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise UsageError(
                    f"--config file {path!r}: {key!r} is {value!r}; expected true or false"
                )
            tokens.append(flag if value else f"--no-{flag[2:]}")
            continue
        if isinstance(value, list):
            if dest != "hidden":
                raise UsageError(f"--config file {path!r}: {key!r} is a list; expected a value")
            value = ",".join(str(v) for v in value) if value else "none"
        elif isinstance(value, (dict, bool)):
            raise UsageError(
                f"--config file {path!r}: {key!r} is {json.dumps(value)}; expected "
                f"{'a list of widths' if dest == 'hidden' else 'a number or a string'}"
            )
        tokens += [flag, str(value)]
    return tokens


def _resolve_optimizer_options(args: argparse.Namespace) -> dict[str, float]:
    defaults = OPTIMIZER_DEFAULTS[args.optimizer]
    if args.momentum is not None and args.optimizer != "sgd":
        raise UsageError(f"--momentum applies to --optimizer sgd only, not {args.optimizer!r}")
    options = {"lr": args.lr if args.lr is not None else defaults["lr"]}
    if args.optimizer == "sgd":
        options["momentum"] = args.momentum if args.momentum is not None else defaults["momentum"]
    options["weight_decay"] = (
        args.weight_decay if args.weight_decay is not None else defaults["weight_decay"]
    )
    return options


def _read_model_config(path: str) -> Any:
    """The Sequential a --model JSON file describes (fresh weights)."""
    import gpubackprop as gb

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--model file {path!r} does not exist") from None
    except UnicodeDecodeError as error:
        raise UsageError(f"--model file {path!r} is not UTF-8 text: {error}") from None
    except OSError as error:
        raise UsageError(f"--model file {path!r} cannot be read: {error}") from None
    try:
        config = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        raise UsageError(f"--model file {path!r} is not valid JSON: {error}") from None
    try:
        return gb.Sequential.from_config(config)
    except (ValueError, TypeError) as error:
        raise UsageError(f"--model file {path!r}: {error}") from None


def _build_model(args: argparse.Namespace, dataset: Any):
    """The network to train: the --model config, or an MLP of --hidden and --activation; its
    first layer standardises the inputs with the training statistics (gb.Standardize), so the
    saved model takes the data set's raw features."""
    import gpubackprop as gb

    d = TRAIN_DEFAULTS
    statistics = None
    if dataset.feature_mean is not None:
        statistics = (dataset.feature_mean, dataset.feature_std)
    if args.model is None:
        hidden = args.hidden if args.hidden is not None else hidden_sizes(d["hidden"])
        activation = args.activation if args.activation is not None else d["activation"]
        return gb.mlp(
            dataset.n_features,
            hidden,
            dataset.n_outputs,
            activation,
            standardize=statistics,
        )
    options = (("--hidden", args.hidden), ("--activation", args.activation))
    given = [flag for flag, value in options if value is not None]
    if given:
        raise UsageError(
            f"--model describes the whole network; {' and '.join(given)} cannot be given with it"
        )
    model = _read_model_config(args.model)
    where = f"--model file {args.model!r}"
    if model.in_features is not None and model.in_features != dataset.n_features:
        raise UsageError(
            f"{where} takes {model.in_features} input features but data set "
            f"{dataset.name!r} has {dataset.n_features}"
        )
    if model.out_features is not None and model.out_features != dataset.n_outputs:
        raise UsageError(
            f"{where} gives {model.out_features} outputs but data set {dataset.name!r} needs "
            f"{dataset.n_outputs}"
        )
    layers = list(model.layers)
    if layers and isinstance(layers[0], gb.Standardize):
        layers = layers[1:]  # replaced by the statistics of this data set, or left out
    if statistics is not None:
        layers.insert(0, gb.Standardize(*statistics))
    return gb.Sequential(*layers)


def _build_optimizer(name: str, parameters, options: dict[str, float]):
    import gpubackprop as gb

    if name == "sgd":
        return gb.SGD(parameters, **options)
    return (gb.Adam if name == "adam" else gb.AdamW)(parameters, **options)


def _check_output_path(option: str, path: str | None) -> None:
    """Fail before training, not after it, when an output cannot be written."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{option} {path!r} is a directory; expected a file path")
    if not target.parent.is_dir():
        raise UsageError(f"{option} {path!r}: directory {str(target.parent)!r} does not exist")


def _final(history: dict[str, list[float]], key: str) -> float | None:
    values = history.get(key)
    return float(values[-1]) if values else None


def _train_metrics(
    args: argparse.Namespace,
    dataset: Any,
    model: Any,
    optimizer: Any,
    optimizer_options: dict[str, float],
    curves: dict[str, list[float]],
    test: dict[str, float],
    train_time: float,
    augment: bool,
) -> dict[str, Any]:
    """What --metrics-json writes: the test result, the final training and validation values,
    the throughput, and everything needed to reproduce the run."""
    import gpubackprop as gb

    regression = dataset.task == "regression"
    metrics: dict[str, Any] = {"dataset": dataset.name, "task": dataset.task}
    if regression:
        metrics["test_mse"] = test["loss"]
    else:
        metrics["test_accuracy"] = test["accuracy"]
    metrics.update(
        {
            "test_loss": test["loss"],
            "final_train_loss": _final(curves, "loss"),
            "final_val_loss": _final(curves, "val_loss"),
        }
    )
    if not regression:
        metrics["final_train_accuracy"] = _final(curves, "accuracy")
        metrics["final_val_accuracy"] = _final(curves, "val_accuracy")
    throughput = curves.get("samples_per_s", [])
    metrics.update(
        {
            # the median epoch: the first one also pays for kernel compilation and warm-up
            "samples_per_s": float(statistics.median(throughput)) if throughput else None,
            # the whole run: every training sample of every epoch over the time fit took
            # (validation included), the rate the summary line prints
            "total_samples_per_s": len(dataset.x_train)
            * len(curves.get("loss", []))
            / max(train_time, 1e-9),
            "epochs": len(curves.get("loss", [])),
            "backend": model.backend.name,
            "device": model.backend.device_name(),
            "dtype": args.dtype,
            "precision": args.precision,
            "seed": args.seed,
            "data_seed": args.data_seed,
            "train_time_s": train_time,
            "n_train": len(dataset.x_train),
            "n_val": 0 if dataset.x_val is None else len(dataset.x_val),
            "n_test": len(dataset.x_test),
            "parameters": model.num_parameters(),
            "model": model.config(),
            "optimizer": {
                "type": type(optimizer).__name__,
                **optimizer_options,
                "schedule": args.schedule,
                "max_norm": args.max_norm,
            },
            "batch_size": args.batch_size,
            "augment": augment,
            "history": {key: [float(v) for v in values] for key, values in curves.items()},
            "gpubackprop_version": gb.__version__,
        }
    )
    return metrics


def _summary_line(
    metrics: dict[str, Any], n_test: int, train_time: float, backend: str, dtype: str
) -> str:
    """The line `gpubackprop train` ends with: the test result, the time and rate of the whole
    run (samples of all epochs over the training time), and the backend (with how "auto" or
    the environment chose it)."""
    if "test_mse" in metrics:
        headline = f"test MSE {metrics['test_mse']:.5g}"
    else:
        correct = round(metrics["test_accuracy"] * n_test)
        headline = (
            f"test accuracy {metrics['test_accuracy']:.4f} "
            f"({correct}/{n_test}), test loss {metrics['test_loss']:.4g}"
        )
    rate = metrics["total_samples_per_s"]
    return (
        f"{headline}; {metrics['epochs']} epochs in {train_time:.1f} s"
        + (f" ({rate:,.0f} samples/s)" if rate else "")
        + f" on {backend}, {dtype}"
    )


@subcommand("train", "train an MLP (default: the embedded digits data set)", _train_arguments)
def train(args: argparse.Namespace) -> int:
    import gpubackprop as gb
    from gpubackprop.data import load_dataset

    started = time.perf_counter()
    # Data-parallel: join the ranks first (a failure from here on ends them all, see main), and
    # pick this rank's GPU before the model is placed; rank 0 alone prints and writes.
    main_rank = gb.distributed.init().is_main if args.distributed else True
    for option, path in (
        ("--save", args.save),
        ("--export-onnx", args.export_onnx),
        ("--metrics-json", args.metrics_json),
        ("--plot", args.plot),
    ):
        if main_rank:  # only rank 0 writes them (other nodes may not have the directory)
            _check_output_path(option, path)
    if args.export_onnx:
        from gpubackprop.onnx_export import require_onnx

        require_onnx()  # fail before training, not after
    if args.plot:
        from gpubackprop.plotting import require_matplotlib

        require_matplotlib()
    optimizer_options = _resolve_optimizer_options(args)
    is_digits = str(args.dataset).strip().lower() == "digits"
    if args.augment and not is_digits:
        raise UsageError(f"--augment is only available for --dataset digits, not {args.dataset!r}")
    augment = is_digits if args.augment is None else args.augment

    dataset = load_dataset(
        args.dataset,
        seed=args.data_seed,
        dtype=args.dtype,
        val_fraction=args.val_fraction,
        augment=augment,
        standardize=False,  # the model standardises: its first layer is gb.Standardize
    )
    regression = dataset.task == "regression"
    loss = gb.MSELoss() if regression else gb.SoftmaxCrossEntropyLoss()

    gb.seed(args.seed)
    model = _build_model(args, dataset)
    model.to(args.backend, dtype=args.dtype, precision=args.precision)
    optimizer = _build_optimizer(args.optimizer, model.parameters(), optimizer_options)
    callbacks = []
    if args.schedule == "cosine":
        callbacks.append(gb.CosineSchedule(args.epochs, base_lr=optimizer_options["lr"]))
    validation = None if dataset.x_val is None else (dataset.x_val, dataset.y_val)
    if args.verbose and main_rank:
        print(
            f"{dataset.name}: {len(dataset.x_train)} train, "
            f"{0 if validation is None else len(dataset.x_val)} validation, "
            f"{len(dataset.x_test)} test samples; {model.num_parameters()} parameters on "
            f"{model.backend.name} ({model.backend.device_name()}), {args.dtype}"
            + ("" if args.precision == "fp32" else f", {args.precision} GEMMs"),
            file=sys.stderr,
        )

    train_started = time.perf_counter()
    history = model.fit(
        dataset.x_train,
        dataset.y_train,
        loss=loss,
        optimizer=optimizer,
        epochs=args.epochs,
        batch_size=args.batch_size,
        validation_data=validation,
        verbose=args.verbose,
        callbacks=callbacks,
        graph=args.graph,
        distributed=args.distributed,
        max_norm=args.max_norm,
    )
    train_time = time.perf_counter() - train_started
    test = model.evaluate(dataset.x_test, dataset.y_test, loss)

    curves = history.history
    metrics = _train_metrics(
        args, dataset, model, optimizer, optimizer_options, curves, test, train_time, augment
    )
    if not main_rank:
        return 0
    if args.distributed:
        metrics["ranks"] = gb.distributed.world_size()
    if args.save:
        summary = {k: metrics[k] for k in ("dataset", "test_loss", "epochs", "seed")}
        gb.save(args.save, model, optimizer, metadata=summary)
    if args.export_onnx:
        gb.export_onnx(model, args.export_onnx)
    if args.plot:
        from gpubackprop.plotting import plot_history

        plot_history(
            curves,
            args.plot,
            title=f"{dataset.name}: {model.num_parameters()} "
            f"parameters, {args.optimizer}, {model.backend.name}",
            loss_label="MSE" if regression else "cross-entropy loss",
        )
    metrics["wall_time_s"] = time.perf_counter() - started
    if args.metrics_json:
        Path(args.metrics_json).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")

    from gpubackprop.backends import describe_choice

    backend = describe_choice(args.backend, model.backend.name)
    print(_summary_line(metrics, len(dataset.x_test), train_time, backend, args.dtype))
    for label, path in (
        ("checkpoint", args.save),
        ("ONNX model", args.export_onnx),
        ("metrics", args.metrics_json),
        ("plot", args.plot),
    ):
        if path:
            print(f"wrote {label} {path}")
    return 0


# -- info -----------------------------------------------------------------------------------------


def _info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _guarded(what: str, compute: Callable[[], Any]) -> Any:
    try:
        return compute()
    except Exception as error:  # info reports what it can; one broken part hides nothing else
        return {"error": f"{what}: {type(error).__name__}: {error}"}


def info_report() -> dict[str, Any]:
    """Versions, backends (available or why not), GPU, kernel files and the kernel caches."""
    import gpubackprop as gb

    report: dict[str, Any] = {
        "gpubackprop": gb.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
    }
    try:
        import cupy

        report["cupy"] = cupy.__version__
    except Exception as error:
        report["cupy"] = f"not importable ({type(error).__name__})"

    def backends() -> dict[str, Any]:
        from gpubackprop.backends import available_backends, get_backend

        table = {}
        for name, (available, reason) in available_backends().items():
            entry: dict[str, Any] = {"available": bool(available)}
            if available:
                entry["device"] = _guarded("device", lambda n=name: get_backend(n).device_name())
            else:
                entry["reason"] = reason
            table[name] = entry
        return table

    report["backends"] = _guarded("backends", backends)
    cupy_entry = report["backends"].get("cupy", {}) if isinstance(report["backends"], dict) else {}
    report["gpu"] = cupy_entry.get("device") if cupy_entry.get("available") else None

    def kernels() -> dict[str, Any]:
        from gpubackprop.kernels import kernel_inventory

        return kernel_inventory()

    report["kernels"] = _guarded("kernels", kernels)

    def emulator_cache() -> dict[str, Any]:
        from gpubackprop.emulator.compiler import cache_dir

        directory = cache_dir()
        libraries = list(directory.glob("*.so")) if directory.is_dir() else []
        return {"directory": str(directory), "entries": len(libraries)}

    report["emulator_cache"] = _guarded("emulator cache", emulator_cache)
    report["distributed"] = _guarded("distributed", gb.distributed.availability)
    return report


def _format_info(report: dict[str, Any]) -> str:
    lines = [
        f"gpubackprop {report['gpubackprop']}",
        f"python {report['python']}, numpy {report['numpy']}, cupy {report['cupy']}",
        f"platform {report['platform']}",
        "",
        "backends:",
    ]
    backends = report["backends"]
    if "error" in backends:
        lines.append(f"  {backends['error']}")
    else:
        for name, entry in backends.items():
            if entry["available"]:
                device = entry.get("device")
                device = device.get("error") if isinstance(device, dict) else device
                lines.append(f"  {name:<6} available: yes  ({device})")
            else:
                lines.append(f"  {name:<6} available: no   ({entry['reason']})")
    lines.append(f"GPU: {report['gpu'] or 'none'}")
    lines.append(_format_distributed(report.get("distributed") or {}))
    kernels = report["kernels"]
    lines.append("")
    if "error" in kernels:
        lines.append(f"kernels: {kernels['error']}")
        return "\n".join(lines)
    lines.append(f"kernels: {kernels.get('directory', '?')}")
    for file, entry in kernels.get("files", {}).items():
        entry_points = ", ".join(entry.get("kernels", [])) or "(header: device functions only)"
        compiled = entry.get("compiled_variants")
        state = "" if compiled is None else f"  [compiled this process: {compiled}]"
        lines.append(f"  {file}: {entry_points}{state}")
    cache = kernels.get("cupy_cache")
    if cache:
        lines.append(
            f"CuPy kernel cache: {cache.get('directory')} ({cache.get('entries', 0)} entries)"
        )
    emulator = report.get("emulator_cache") or {}
    if "directory" in emulator:
        lines.append(
            f"emulator cache: {emulator['directory']} ({emulator['entries']} compiled libraries)"
        )
    return "\n".join(lines)


def _format_distributed(entry: dict[str, Any]) -> str:
    """The info line for data-parallel training (docs/distributed.md)."""
    if "error" in entry:
        return f"distributed: {entry['error']}"
    if entry.get("mpi_hint"):
        mpi = f"no MPI ({entry['mpi_hint']})"
    else:
        mpi = f"mpi4py {entry['mpi4py']}, mpich {entry['mpich'] or '(system MPI)'}, "
        mpi += f"mpiexec {entry['mpiexec']}"
    return f"distributed: {mpi}; NCCL {entry.get('nccl')}"


@subcommand("info", "versions, backends, GPU and kernel files", _info_arguments)
def info(args: argparse.Namespace) -> int:
    report = info_report()
    print(json.dumps(report, indent=2) if args.json else _format_info(report))
    return 0


# -- gradcheck ------------------------------------------------------------------------------------


def _gradcheck_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        choices=DEVICE_BACKENDS,
        default="numpy",
        help="backend whose float64 gradients are checked (default numpy)",
    )
    parser.add_argument(
        "--activation",
        choices=(*CLI_ACTIVATIONS, "all"),
        default="all",
        help="activation of the hidden blocks (default all: one block each)",
    )
    parser.add_argument(
        "--loss",
        choices=("cross_entropy", "mse", "bce_with_logits"),
        default="cross_entropy",
        help="(default cross_entropy)",
    )
    parser.add_argument(
        "--width",
        type=positive_int,
        default=7,
        help="hidden width (default 7, an odd size on purpose)",
    )
    parser.add_argument("--batch", type=positive_int, default=5, help="rows (default 5)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="(default 0)")


@subcommand(
    "gradcheck", "finite-difference check of backprop on a small model", _gradcheck_arguments
)
def gradcheck(args: argparse.Namespace) -> int:
    import gpubackprop as gb

    activations = CLI_ACTIVATIONS if args.activation == "all" else (args.activation,)
    n_in, n_out, width = 6, 3, args.width
    gb.seed(args.seed)
    # Dense + activation, then one residual block per activation (y = x + f(Wx + b)), then the
    # output layer: every fused step, every activation and the residual path are checked.
    layers = [gb.Dense(n_in, width), activation_layer(activations[0])]
    for name in activations:
        layers.append(gb.Residual(gb.Dense(width, width), activation_layer(name)))
    layers.append(gb.Dense(width, n_out))
    model = gb.Sequential(*layers).to("numpy", dtype="float64")
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.batch, n_in))
    if args.loss == "cross_entropy":
        loss, y = gb.SoftmaxCrossEntropyLoss(), rng.integers(0, n_out, args.batch)
    elif args.loss == "mse":
        loss, y = gb.MSELoss(), rng.standard_normal((args.batch, n_out))
    else:
        loss, y = gb.BCEWithLogitsLoss(), rng.integers(0, 2, (args.batch, n_out)).astype(float)
    result = gb.gradcheck(
        model, x, y, loss, backend=args.backend, max_elements=None, seed=args.seed
    )
    print(
        f"gradcheck on {args.backend}, float64: {model.num_parameters()} parameters, "
        f"activations {', '.join(activations)}, loss {args.loss}"
    )
    print(result)
    print("PASSED" if result.passed else "FAILED")
    return 0 if result.passed else 1


# -- bench (gpubackprop.benchmarks owns its options) --------------------------------------------


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    from gpubackprop.benchmarks import add_arguments

    add_arguments(parser)


@subcommand(
    "bench", "throughput benchmarks against cuBLAS, PyTorch and the floor", _bench_arguments
)
def bench(args: argparse.Namespace) -> int:
    from gpubackprop.benchmarks import run_from_args

    return run_from_args(args)


# -- parity ---------------------------------------------------------------------------------------


def _parity_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        action="append",
        choices=DEVICE_BACKENDS,
        default=None,
        help="backend to check (repeatable; default: every available one but numpy, "
        "or numpy alone when no kernel backend is usable)",
    )
    parser.add_argument(
        "--dtype",
        action="append",
        choices=DTYPES,
        default=None,
        help="dtype to check (repeatable; default float32)",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="every shape and every activation × loss training run "
        "(default: a representative subset)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--failures-only", action="store_true", help="print failing rows only")


@subcommand(
    "parity", "every op and a whole model on each backend vs NumPy float64", _parity_arguments
)
def parity(args: argparse.Namespace) -> int:
    from gpubackprop.backends import available_backends
    from gpubackprop.parity import parity_report

    usable = {name for name, (ok, _) in available_backends().items() if ok}
    backends = args.backend or sorted(usable - {"numpy"}) or ["numpy"]
    for name in backends:
        if name not in usable:
            reason = available_backends()[name][1]
            raise RuntimeError(f"backend {name!r} is not available: {reason}")
    report = parity_report(
        backends, dtypes=tuple(args.dtype or ["float32"]), quick=not args.full, seed=args.seed
    )
    print(report.format(failures_only=args.failures_only))
    return 0 if report.passed else 1


# -- main -----------------------------------------------------------------------------------------


def _version() -> str:
    import gpubackprop

    return getattr(gpubackprop, "__version__", "unknown")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Dense neural networks trained with backpropagation in hand-written CUDA "
        "kernels (NumPy and CPU-emulator backends without a GPU).",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for entry in SUBCOMMANDS.values():
        sub = commands.add_parser(entry.name, help=entry.help, description=entry.help)
        try:
            entry.add_arguments(sub)
        except ImportError as error:  # an optional subcommand whose module is missing
            sub.description = f"{entry.help} (unavailable: {error})"
        sub.set_defaults(run=entry.run, parser=sub)
    return parser


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing what is still buffered at exit cannot raise
    BrokenPipeError again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor
        pass


def _stop_other_ranks(code: int, error: BaseException) -> None:
    """After `train --distributed` failed on this rank: end every rank (the others would wait
    in their next collective for this one)."""
    from gpubackprop import distributed

    distributed.abort_other_ranks(code, error)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    sub_parser: argparse.ArgumentParser = args.parser
    try:
        if getattr(args, "config", None):
            tokens = _config_to_argv(args.config, sub_parser)
            # config first, then the user's flags: argparse keeps the last value given.
            args = parser.parse_args([args.command, *tokens, *argv[argv.index(args.command) + 1 :]])
        status = args.run(args)
        sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
        return status
    except BrokenPipeError:
        # The reader went away (`gpubackprop info | head -1`): stop quietly, as Unix tools do.
        _silence_stdout()
        return 0
    except (
        UsageError,
        ValueError,
        TypeError,
        FileNotFoundError,
        IsADirectoryError,
        ImportError,
    ) as error:
        if os.environ.get("GPUBACKPROP_DEBUG"):
            raise
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        _stop_other_ranks(2, error)
        return 2
    except (RuntimeError, FloatingPointError, OSError) as error:
        if os.environ.get("GPUBACKPROP_DEBUG"):
            raise
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        _stop_other_ranks(1, error)
        return 1
    except MemoryError as error:
        if os.environ.get("GPUBACKPROP_DEBUG"):
            raise
        # NumPy's message names the allocation ("Unable to allocate 1.9 TiB for an array with
        # shape (4000000000, 64) ..."), which is the size the user asked for.
        detail = str(error) or "an allocation failed"
        print(
            f"{PROG} {args.command}: error: out of memory: {detail} (smaller layer widths, "
            "batches or data sets need less)",
            file=sys.stderr,
        )
        _stop_other_ranks(1, error)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
