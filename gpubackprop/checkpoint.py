"""Checkpoints: ``save`` / ``load`` a model (and optionally its optimizer) as a safetensors file.

No pickle: the file is a safetensors container, so loading one runs no code.  Layout:

- tensors ``model.<parameter or buffer name>`` (``model.0.weight``, ``model.2.0.bias``,
  ``model.0.mean``, ...) and
  ``optimizer.<buffer>.<parameter name>`` (``optimizer.exp_avg.0.weight``), all in the model's
  dtype, bitwise as they were in memory;
- string metadata: ``format`` = "gpubackprop-checkpoint", ``format_version``, ``config`` (the
  model's ``config()`` as JSON), ``dtype``, ``optimizer`` (JSON: type, hyperparams, step and the
  names of the parameters it updates; absent without an optimizer), ``metadata`` (the caller's
  JSON) and ``gpubackprop_version``.

Writing is atomic: the bytes go to a temporary file in the target's directory, are flushed and
fsync'ed, then ``os.replace`` puts them in place, so a crash leaves either the old file or the
new one, never a mixture.  A killed save leaves its temporary behind; the next save of the same
target deletes it (the temporary's name holds its writer's pid, so a concurrent save's file is
left alone).  Loading validates everything (format, version, config, every tensor's
name, shape and dtype) before it builds anything the caller sees; the layer sizes in the config
are checked against the file's tensors before the model is built, so a small file cannot make
the loader allocate a huge model.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ._version import __version__
from .callbacks import Callback, check_monitor, improved, mode_for
from .checks import check_int
from .dtypes import DTYPES
from .layers import MAX_CONFIG_DEPTH
from .model import Sequential
from .optim import OPTIMIZER_TYPES, optimizer_from_state_dict
from .random import generator

__all__ = ["FORMAT", "FORMAT_VERSION", "load", "read_metadata", "remove_stale_temporaries", "save"]

FORMAT = "gpubackprop-checkpoint"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MODEL_PREFIX = "model."
OPTIMIZER_PREFIX = "optimizer."


def _json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, allow_nan=True)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} must be JSON-serialisable: {error}") from None


# -- saving --------------------------------------------------------------------------------------


def _optimizer_payload(model, optimizer) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """The optimizer's metadata entry and tensors; checks that it updates this model."""
    # Names by position in this model (as its state_dict has them), not Parameter.name, which
    # another Sequential built around the same layers may have overwritten.
    model_params = {id(p): name for name, p in model.named_parameters().items()}
    names = []
    for p in optimizer.params:
        if id(p) not in model_params:
            raise ValueError(
                f"optimizer updates parameter {p.name!r}, which is not one of this model's "
                "parameters; pass the optimizer built from model.parameters()"
            )
        names.append(model_params[id(p)])
    state = optimizer.state_dict()
    info = {
        "type": state["type"],
        "hyperparams": state["hyperparams"],
        "step": int(state["step"]),
        "params": names,
    }
    # state_dict keys are "<buffer>.<Parameter.name>" (buffer names hold no dot)
    renamed = {p.name: model_params[id(p)] for p in optimizer.params}
    tensors = {}
    for key, value in state["buffers"].items():
        buffer, _, name = key.partition(".")
        tensors[f"{OPTIMIZER_PREFIX}{buffer}.{renamed.get(name, name)}"] = np.ascontiguousarray(
            value
        )
    return {"optimizer": _json(info, "optimizer hyperparameters")}, tensors


def _serialize(model, optimizer, metadata: dict | None) -> bytes:
    from safetensors.numpy import save as safetensors_save

    config = model.config()
    state = model.state_dict()
    dtype = np.dtype(model.dtype).name
    tensors = {f"{MODEL_PREFIX}{name}": np.ascontiguousarray(v) for name, v in state.items()}
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": _json(config, "model config"),
        "dtype": dtype,
        "metadata": _json(metadata or {}, "metadata"),
        "gpubackprop_version": __version__,
    }
    if optimizer is not None:
        optimizer_header, optimizer_tensors = _optimizer_payload(model, optimizer)
        header.update(optimizer_header)
        tensors.update(optimizer_tensors)
    return safetensors_save(tensors, metadata=header)


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# A temporary file is named .<target name>.<host tag>-<pid>.<random>.tmp, so that a later save of
# the same target can tell a temporary left by a killed save (its process is gone) from one
# that a concurrent save is still writing (its process is alive).  The host tag keeps a save on
# another machine sharing the directory from judging our processes by its own process table.
_TEMPORARY_SUFFIX = ".tmp"
# A temporary whose writer cannot be checked (another host, or a name without a pid) counts as
# stale once it has not been modified for this long: no save takes an hour to write its bytes.
_UNCHECKABLE_STALE_AFTER_S = 3600.0


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.{_host_tag()}-{os.getpid()}."


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # alive but someone else's, or cannot tell
        return True
    return True


def _is_stale_temporary(candidate: Path, now: float) -> bool:
    """True for a temporary of a save that can no longer finish (see _temporary_prefix)."""
    owner = candidate.name.split(".")[-3] if candidate.name.count(".") >= 3 else ""
    host, _, pid = owner.partition("-")
    if host == _host_tag() and pid.isdigit():
        return not _process_alive(int(pid))
    try:
        age = now - candidate.stat().st_mtime
    except OSError:
        return False
    return age > _UNCHECKABLE_STALE_AFTER_S


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed saves of ``path`` left in its directory (their
    process is gone), never one that a running save is writing.  Returns the deleted paths."""
    path = Path(path)
    now = time.time()
    removed = []
    with contextlib.suppress(OSError):
        for candidate in path.parent.glob(f".{glob.escape(path.name)}.*{_TEMPORARY_SUFFIX}"):
            if candidate.is_file() and _is_stale_temporary(candidate, now):
                with contextlib.suppress(FileNotFoundError):  # another save removed it first
                    candidate.unlink()
                    removed.append(candidate)
    return removed


def _write_atomic(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that readers see the old file or the whole new one.
    Temporaries that killed saves of ``path`` left behind are removed first."""
    directory = path.parent
    if not directory.is_dir():
        raise FileNotFoundError(
            f"cannot save checkpoint {str(path)!r}: directory {str(directory)!r} does not exist"
        )
    remove_stale_temporaries(path)
    fd, temporary = tempfile.mkstemp(
        prefix=_temporary_prefix(path), suffix=_TEMPORARY_SUFFIX, dir=directory
    )
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file 0600; give it the permissions a plain open() would.
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    # Persist the rename itself (POSIX); not possible everywhere, and only durability is at stake.
    with contextlib.suppress(OSError, AttributeError):
        directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)


def save(
    path: str | os.PathLike,
    model,
    optimizer=None,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Save ``model`` (config and weights) and optionally ``optimizer`` (hyperparameters, step
    count and state buffers) to ``path`` as a safetensors file, atomically.

    ``metadata`` is any JSON-serialisable dict kept with the checkpoint (epoch, metrics, ...);
    ``read_metadata(path)["metadata"]`` returns it.  An existing file at ``path`` is replaced
    only once the new one is completely on disk.
    """
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata is {type(metadata).__name__}; expected a dict or None")
    payload = _serialize(model, optimizer, metadata)
    _write_atomic(Path(path), payload)


# -- loading -------------------------------------------------------------------------------------


def _open(path: Path):
    """(metadata, {name: (dtype name, shape)}, handle) of a safetensors file, errors wrapped."""
    from safetensors import safe_open

    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {str(path)!r} is a directory, not a file")
    try:  # the safetensors reader reports an unreadable file as "No such file or directory"
        os.close(os.open(path, os.O_RDONLY))
    except PermissionError:
        mode = stat.filemode(path.stat().st_mode)
        raise PermissionError(
            f"checkpoint {str(path)!r} cannot be read: permission denied (mode {mode}); "
            "give this user read access (chmod u+r)"
        ) from None
    try:
        return safe_open(str(path), framework="numpy")
    except Exception as error:  # SafetensorError, or OSError from the reader
        raise ValueError(
            f"checkpoint {str(path)!r} is truncated or not a safetensors file: {error}"
        ) from None


def _parse_header(path: Path, metadata: dict[str, str] | None) -> dict[str, Any]:
    """Check the format keys and decode the JSON entries."""
    where = f"checkpoint {str(path)!r}"
    if not metadata or "format" not in metadata:
        raise ValueError(
            f"{where} is a safetensors file but not a gpubackprop checkpoint: its metadata has no "
            f"'format' entry (found keys {sorted(metadata or {})})"
        )
    if metadata["format"] != FORMAT:
        raise ValueError(f"{where} has format {metadata['format']!r}; expected {FORMAT!r}")
    raw_version = metadata.get("format_version")
    try:
        version = int(raw_version)
    except (TypeError, ValueError):
        version = None
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(
            f"{where} has format_version {raw_version!r}, which this gpubackprop "
            f"({__version__}) does not support; supported: {list(SUPPORTED_VERSIONS)}"
        )
    header: dict[str, Any] = {"format_version": version}
    for key in ("config", "metadata", "optimizer"):
        if key not in metadata:
            if key == "config":
                raise ValueError(f"{where} has no 'config' metadata entry")
            header[key] = {} if key == "metadata" else None
            continue
        try:
            header[key] = json.loads(metadata[key])
        except json.JSONDecodeError as error:
            raise ValueError(f"{where} has invalid JSON in its {key!r} entry: {error}") from None
        except RecursionError:
            raise ValueError(
                f"{where} has JSON nested too deeply to read in its {key!r} entry; a "
                "gpubackprop checkpoint nests at most a few levels"
            ) from None
    dtype = metadata.get("dtype")
    if dtype not in DTYPES:
        raise ValueError(f"{where} has dtype {dtype!r}; expected one of {DTYPES}")
    header["dtype"] = dtype
    header["gpubackprop_version"] = metadata.get("gpubackprop_version", "unknown")
    optimizer = header["optimizer"]
    if optimizer is not None and not (
        isinstance(optimizer, dict)
        and isinstance(optimizer.get("type"), str)
        and isinstance(optimizer.get("hyperparams"), dict)
        and isinstance(optimizer.get("step"), int)
        and isinstance(optimizer.get("params"), list)
    ):
        raise ValueError(
            f"{where} has an invalid 'optimizer' entry {optimizer!r:.200}; expected "
            "{type, hyperparams, step, params}"
        )
    return header


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded header of a checkpoint without loading its tensors: format_version, config,
    dtype, optimizer (or None), metadata (the caller's dict), gpubackprop_version and
    ``tensors`` ({name: (dtype, shape)})."""
    path = Path(path)
    with _open(path) as handle:
        header = _parse_header(path, handle.metadata())
        header["tensors"] = {
            name: (handle.get_slice(name).get_dtype(), tuple(handle.get_slice(name).get_shape()))
            for name in handle.keys()
        }
    return header


# safetensors dtype codes → NumPy names, for the dtype check before any tensor is read.
_SAFETENSORS_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "U32": "uint32",
    "I32": "int32",
    "U64": "uint64",
    "I64": "int64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
}


_CONTAINER_TYPES = ("Sequential", "Residual")


def _config_backed_by_tensors(config: Any, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Refuse a config whose layer sizes the file's own tensors do not back, before anything
    is allocated: every Dense(in, out) needs ``model.<name>.weight`` of shape (out, in) (and
    its bias of shape (out,)) in the file, and no other layer may name a size larger than the
    largest dimension of any tensor in it.  Building the model from an unchecked config could
    allocate gigabytes for a 1 KB file."""
    if not isinstance(config, dict) or config.get("type") != "Sequential":
        raise ValueError(
            f"{where} has an invalid model config: expected a dict with type 'Sequential', "
            f"got {config!r:.200}"
        )
    largest = max((max(shape, default=1) for shape in shapes.values()), default=0)

    def need(name: str, shape: tuple[int, ...]) -> None:
        key = f"{MODEL_PREFIX}{name}"
        if key not in shapes:
            raise ValueError(
                f"{where} is missing tensor {key!r}, of shape {shape} by the model config"
            )
        if shapes[key] != shape:
            raise ValueError(
                f"{where}: tensor {key!r} has shape {shapes[key]}; expected {shape} "
                "(from the model config)"
            )

    def walk(layers: Any, prefix: str, depth: int = 0) -> None:
        if depth > MAX_CONFIG_DEPTH:
            raise ValueError(
                f"{where} has an invalid model config: containers nest deeper than "
                f"{MAX_CONFIG_DEPTH} levels"
            )
        if not isinstance(layers, list):
            raise ValueError(
                f"{where} has an invalid model config: 'layers' is {layers!r:.100}; expected a list"
            )
        for i, layer in enumerate(layers):
            if not isinstance(layer, dict):
                raise ValueError(
                    f"{where} has an invalid model config: layer {prefix}{i} is {layer!r:.100}; "
                    "expected a dict with a 'type' key"
                )
            kind = layer.get("type")
            if kind in _CONTAINER_TYPES:
                walk(layer.get("layers", []), f"{prefix}{i}.", depth + 1)
            elif kind == "Dense":
                sizes = []
                for key in ("in_features", "out_features"):
                    try:
                        sizes.append(check_int(key, layer.get(key)))
                    except ValueError as error:
                        raise ValueError(
                            f"{where} has an invalid model config: layer {prefix}{i} (Dense): "
                            f"{error}"
                        ) from None
                need(f"{prefix}{i}.weight", (sizes[1], sizes[0]))
                if layer.get("bias", True):
                    need(f"{prefix}{i}.bias", (sizes[1],))
            else:
                for key, value in layer.items():
                    if isinstance(value, int) and not isinstance(value, bool) and value > largest:
                        raise ValueError(
                            f"{where} has an invalid model config: layer {prefix}{i} ({kind}) "
                            f"has {key}={value}, larger than any tensor in the file "
                            f"(largest dimension {largest})"
                        )

    walk(config.get("layers", []), "")


def _build_model(config: Any, where: str):
    """Sequential.from_config without disturbing gb.seed()'s stream (init draws from it)."""

    state = generator().bit_generator.state
    try:
        return Sequential.from_config(config)
    except Exception as error:
        raise ValueError(f"{where} has an invalid model config: {error}") from None
    finally:
        generator().bit_generator.state = state


def load(
    path: str | os.PathLike,
    backend: Any = None,
    dtype: Any = None,
    with_optimizer: bool = False,
    precision: str = "fp32",
):
    """Load a checkpoint written by ``save``.

    The model is rebuilt from its config and placed on ``backend`` (default: the
    GPUBACKPROP_BACKEND variable or "auto") in ``dtype`` (default: the saved dtype) with GEMM
    ``precision`` (checkpoints hold the fp32 master weights whatever precision trained them;
    "bf16" rebuilds the bf16 copy from them); its weights are the saved ones bit for bit
    (converted when ``dtype`` differs).  With
    ``with_optimizer=True`` returns ``(model, optimizer)``, the optimizer rebuilt with its
    hyperparameters, step count and buffers, or None when none was saved.

    Raises FileNotFoundError for a missing file and ValueError, naming the problem, for a
    truncated or foreign file, an unsupported format version, an invalid config, or a tensor
    that is missing, unexpected, or of the wrong shape or dtype.
    """
    path = Path(path)
    where = f"checkpoint {str(path)!r}"
    with _open(path) as handle:
        header = _parse_header(path, handle.metadata())
        names = list(handle.keys())
        dtypes = {name: handle.get_slice(name).get_dtype() for name in names}
        shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in names}
        saved_dtype = header["dtype"]
        for name in names:
            found = _SAFETENSORS_DTYPES.get(dtypes[name], dtypes[name])
            if found != saved_dtype:
                raise ValueError(
                    f"{where}: tensor {name!r} has dtype {found}; expected {saved_dtype} "
                    "(the checkpoint's dtype)"
                )
        _config_backed_by_tensors(header["config"], shapes, where)

        model = _build_model(header["config"], where)
        target_dtype = header["dtype"] if dtype is None else dtype
        model.to(backend, dtype=target_dtype, precision=precision)
        parameters = model.named_parameters()
        expected = {f"{MODEL_PREFIX}{name}": p.shape for name, p in parameters.items()}
        # buffers (Standardize's mean and std) are saved beside the parameters
        expected.update(
            {f"{MODEL_PREFIX}{name}": b.shape for name, b in model.named_buffers().items()}
        )

        optimizer_info = header["optimizer"]
        if optimizer_info is not None:
            unknown = sorted(set(optimizer_info["params"]) - set(parameters))
            if unknown:
                raise ValueError(
                    f"{where}: the optimizer updates parameters {unknown} that the model lacks"
                )
            buffer_names = _buffer_names(optimizer_info, where)
            if optimizer_info["step"] > 0:
                for buffer in buffer_names:
                    for name in optimizer_info["params"]:
                        key = f"{OPTIMIZER_PREFIX}{buffer}.{name}"
                        expected[key] = parameters[name].shape

        missing = [name for name in expected if name not in shapes]
        if missing:
            raise ValueError(
                f"{where} is missing tensor {missing[0]!r}"
                + (f" (and {len(missing) - 1} more: {missing[1:]})" if len(missing) > 1 else "")
            )
        unexpected = [name for name in names if name not in expected]
        if unexpected:
            raise ValueError(
                f"{where} holds unexpected tensor {unexpected[0]!r}"
                + (f" (and {unexpected[1:]})" if len(unexpected) > 1 else "")
                + "; the model config does not have it"
            )
        for name in names:
            if shapes[name] != tuple(expected[name]):
                raise ValueError(
                    f"{where}: tensor {name!r} has shape {shapes[name]}; expected "
                    f"{tuple(expected[name])}"
                )
        try:
            tensors = {name: np.array(handle.get_tensor(name)) for name in names}
        except Exception as error:
            raise ValueError(f"{where} is truncated or corrupt: {error}") from None

    prefix = len(MODEL_PREFIX)
    model.load_state_dict(
        {name[prefix:]: value for name, value in tensors.items() if name.startswith(MODEL_PREFIX)}
    )
    if not with_optimizer:
        return model
    if optimizer_info is None:
        return model, None
    return model, _build_optimizer(model, optimizer_info, tensors, where)


def _buffer_names(optimizer_info: dict, where: str) -> tuple[str, ...]:

    kind = optimizer_info["type"]
    if kind not in OPTIMIZER_TYPES:
        raise ValueError(
            f"{where} has optimizer type {kind!r}; expected one of {sorted(OPTIMIZER_TYPES)}"
        )
    names = OPTIMIZER_TYPES[kind].buffer_names
    # SGD keeps no momentum buffer when momentum is 0 (as torch.optim.SGD).
    if kind == "SGD" and not optimizer_info["hyperparams"].get("momentum", 0.0):
        names = ()
    return tuple(names)


def _build_optimizer(model, optimizer_info: dict, tensors: dict[str, np.ndarray], where: str):

    parameters = model.named_parameters()
    buffers = {
        name[len(OPTIMIZER_PREFIX) :]: value
        for name, value in tensors.items()
        if name.startswith(OPTIMIZER_PREFIX)
    }
    state = {
        "type": optimizer_info["type"],
        "hyperparams": optimizer_info["hyperparams"],
        "step": optimizer_info["step"],
        "buffers": buffers,
    }
    params = [parameters[name] for name in optimizer_info["params"]]
    try:
        return optimizer_from_state_dict(params, state)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where} has an invalid optimizer state: {error}") from None


class ModelCheckpoint(Callback):
    """Save a checkpoint (gb.save, atomic) after each epoch, or only when ``monitor``
    improves with save_best_only.  ``path`` may contain ``{epoch}``."""

    main_process_only = True

    def __init__(
        self,
        path: str | Path,
        monitor: str = "val_loss",
        save_best_only: bool = False,
        mode: str = "auto",
        save_optimizer: bool = True,
    ):
        self.path = str(path)
        self.monitor, self.save_best_only = monitor, save_best_only
        self.mode = mode_for(monitor, mode)
        self.save_optimizer = save_optimizer
        self.best = math.inf if self.mode == "min" else -math.inf
        self.saved: list[str] = []

    def check_setup(self, metrics: set[str]) -> None:
        if self.save_best_only:
            check_monitor("ModelCheckpoint", self.monitor, metrics)
        try:
            first = Path(self.path.format(epoch=1))
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(
                f"ModelCheckpoint path={self.path!r} is not a valid template: {error!r}; the "
                "only field it may hold is {epoch}"
            ) from None
        if first.is_dir():
            raise ValueError(f"ModelCheckpoint path={self.path!r} is a directory; expected a file")
        if not first.parent.is_dir():
            raise FileNotFoundError(
                f"ModelCheckpoint path={self.path!r}: directory {str(first.parent)!r} does not "
                "exist; create it first"
            )

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        if self.save_best_only:
            if self.monitor not in logs:
                raise ValueError(
                    f"ModelCheckpoint monitor={self.monitor!r} is not among the "
                    f"metrics {sorted(logs)}"
                )
            if not improved(self.mode, logs[self.monitor], self.best, 0.0):
                return
            self.best = logs[self.monitor]
        path = self.path.format(epoch=epoch)
        save(
            path,
            self.model,
            self.optimizer if self.save_optimizer else None,
            metadata={"epoch": epoch, **{k: float(v) for k, v in logs.items()}},
        )
        self.saved.append(path)
