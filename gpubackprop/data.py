"""Data sets: the embedded digits, two synthetic problems, and loaders for .npz and MNIST IDX.

Every loader returns a :class:`Dataset` with a fixed train/test split: the same ``seed`` gives
the same split on every call and every machine (NumPy's PCG64 stream is stable).  Features are
standardised with statistics of the *training* part only, so nothing about the test set leaks
into training:

    x' = (x − μ_train) / σ_train,   σ_train := 1 where σ_train = 0 (a constant feature).

The statistics are kept on the Dataset (``feature_mean``, ``feature_std``) whether or not they
were applied: with ``standardize=False`` the features stay raw and a model can carry the
standardisation itself as its first layer, ``gb.Standardize(d.feature_mean, d.feature_std)``
(what ``gpubackprop train`` does), so that a saved model takes raw features.

Classification labels are int64 class indices 0..n_classes−1; regression targets are floats of
shape (N, n_targets).
"""

from __future__ import annotations

import gzip
import math
import os
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .checks import check_int, check_number
from .dtypes import check_dtype

__all__ = [
    "DATASET_NAMES",
    "Dataset",
    "feature_mean_and_std",
    "load_dataset",
    "load_digits",
    "load_mnist_idx",
    "load_npz",
    "make_regression",
    "make_spirals",
    "read_idx",
    "shift_digits",
    "standardize",
    "train_test_split",
    "write_idx",
]

DATASET_NAMES = ("digits", "spirals", "regression", "npz:PATH", "mnist:DIR")
TASKS = ("classification", "regression")
_DIGITS_PATH = Path(__file__).resolve().parent / "datasets" / "digits.npz"


@dataclass
class Dataset:
    """A train/test split, and optionally a validation part held out of the training data.
    ``n_classes`` is 0 for regression; ``n_outputs`` is what the last layer must produce
    (classes, or targets per sample)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    name: str
    task: str = "classification"
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    # μ and σ of the training part, one per feature (float64), or None for a data set that is
    # not standardised (the synthetic regression); ``standardized`` says whether the features
    # above had them applied.
    feature_mean: np.ndarray | None = None
    feature_std: np.ndarray | None = None
    standardized: bool = False

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_outputs(self) -> int:
        return self.n_classes if self.task == "classification" else int(self.y_train.shape[1])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, task={self.task!r}, train={self.x_train.shape}, "
            f"val={None if self.x_val is None else self.x_val.shape}, "
            f"test={self.x_test.shape}, n_features={self.n_features}, "
            f"n_outputs={self.n_outputs}, dtype={self.x_train.dtype})"
        )


# -- splitting and standardising -----------------------------------------------------------------


def train_test_split(
    n_samples: int,
    test_fraction: float,
    seed: int,
    labels: np.ndarray | None = None,
    name: str = "test_fraction",
) -> tuple[np.ndarray, np.ndarray]:
    """Return (train_indices, test_indices), disjoint and together covering range(n_samples).

    With ``labels`` the split is stratified: each class gives round(test_fraction · n_c) of its
    n_c samples to the test set, so class proportions match in both parts.  Both index arrays
    are shuffled (training data must not arrive sorted by class).
    """
    fraction = check_number(name, test_fraction, 0.0, 1.0, low_open=True, high_open=True)
    if n_samples < 2:
        raise ValueError(f"n_samples={n_samples} is too small to split; need at least 2")
    rng = np.random.default_rng(seed)
    if labels is None:
        order = rng.permutation(n_samples)
        n_test = min(max(1, round(fraction * n_samples)), n_samples - 1)
        return order[n_test:], order[:n_test]
    train_parts, test_parts = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_test = round(fraction * len(members))
        if len(members) >= 2:  # a class with one sample goes to training
            n_test = min(max(n_test, 1), len(members) - 1)
        else:
            n_test = 0
        test_parts.append(members[:n_test])
        train_parts.append(members[n_test:])
    train = rng.permutation(np.concatenate(train_parts))
    test = rng.permutation(np.concatenate(test_parts))
    if len(test) == 0:  # only singleton classes: the test set still gets one sample
        train, test = train[1:], train[:1]
    return train, test


def feature_mean_and_std(
    x_train: np.ndarray, per_feature: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(μ, σ) of ``x_train`` in float64, per feature or one scalar pair; σ = 0 becomes 1 so
    that a constant feature maps to 0 instead of NaN."""
    train = np.asarray(x_train, dtype=np.float64)
    axis = 0 if per_feature else None
    std = train.std(axis=axis)
    return train.mean(axis=axis), np.where(std > 0, std, 1.0)


def standardize(
    x_train: np.ndarray, x_test: np.ndarray, per_feature: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(x − μ) / σ for both arrays with μ, σ from ``x_train`` only (``feature_mean_and_std``)."""
    mean, std = feature_mean_and_std(x_train, per_feature=per_feature)
    train, test = np.asarray(x_train, np.float64), np.asarray(x_test, np.float64)
    return (train - mean) / std, (test - mean) / std


Augment = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _split_and_assemble(
    x: np.ndarray,
    y: np.ndarray,
    *,
    name: str,
    task: str,
    test_fraction: float,
    seed: int,
    dtype: Any,
    **options: Any,
) -> Dataset:
    """Split (stratified for classification) and hand over to _assemble; x, y validated."""
    stratify = y if task == "classification" else None
    train, test = train_test_split(len(x), test_fraction, seed, labels=stratify)
    return _assemble(
        x[train],
        y[train],
        x[test],
        y[test],
        name=name,
        task=task,
        dtype=dtype,
        seed=seed,
        **options,
    )


def _assemble(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    name: str,
    task: str,
    dtype: Any,
    seed: int = 0,
    val_fraction: float = 0.0,
    augment: Augment | None = None,
    standardize_features: bool = True,
    apply_standardization: bool = True,
    per_feature: bool = True,
    n_classes: int | None = None,
) -> Dataset:
    """Hold out the validation part, augment the rest, standardise with its statistics, cast.

    The order matters: validation and test rows are never augmented, and the standardisation
    statistics come from the (augmented) training rows alone.  ``standardize_features``
    says whether the data set has statistics at all; ``apply_standardization`` whether they
    are applied to the features (else only recorded on the Dataset).
    """
    float_dtype = check_dtype(dtype)
    x_val = y_val = None
    if val_fraction:
        stratify = y_train if task == "classification" else None
        train, val = train_test_split(
            len(x_train), val_fraction, seed, labels=stratify, name="val_fraction"
        )
        x_train, y_train, x_val, y_val = x_train[train], y_train[train], x_train[val], y_train[val]
    if augment is not None:
        x_train, y_train = augment(x_train, y_train)
    mean = std = None
    if standardize_features:
        mean, std = feature_mean_and_std(x_train, per_feature=per_feature)
        # one value per feature even for a global (scalar) statistic, as gb.Standardize takes
        features = int(np.asarray(x_train).shape[1])
        mean = np.broadcast_to(mean, (features,)).astype(np.float64)
        std = np.broadcast_to(std, (features,)).astype(np.float64)
        if apply_standardization:
            x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
            x_val = None if x_val is None else (x_val - mean) / std

    def features(x):
        return None if x is None else np.ascontiguousarray(x, dtype=float_dtype)

    def targets(y, rows):
        if y is None:
            return None
        if task == "classification":
            return np.ascontiguousarray(y, dtype=np.int64)
        return np.ascontiguousarray(y, dtype=float_dtype).reshape(rows, -1)

    labels = [y for y in (y_train, y_test, y_val) if y is not None]
    if task == "classification" and n_classes is None:
        n_classes = max(int(np.max(y, initial=-1)) for y in labels) + 1
    return Dataset(
        features(x_train),
        targets(y_train, len(x_train)),
        features(x_test),
        targets(y_test, len(x_test)),
        int(n_classes or 0),
        name,
        task,
        features(x_val),
        targets(y_val, 0 if x_val is None else len(x_val)),
        mean,
        std,
        bool(standardize_features and apply_standardization),
    )


# -- the embedded data set and the synthetic ones ------------------------------------------------


def shift_digits(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Augment 8×8 digit images with their copies shifted by one pixel up, down, left and
    right (the vacated row or column is 0, the background): 5× the rows, labels repeated.

    A digit moved by a pixel is the same digit, so the network learns some translation
    invariance that 1438 training images do not show it."""
    grid = np.asarray(images).reshape(-1, 8, 8)
    shifted = [grid]
    for axis, step in ((1, 1), (1, -1), (2, 1), (2, -1)):
        moved = np.roll(grid, step, axis=axis)
        vacated = 0 if step > 0 else -1
        if axis == 1:
            moved[:, vacated, :] = 0
        else:
            moved[:, :, vacated] = 0
        shifted.append(moved)
    return np.concatenate(shifted).reshape(-1, 64), np.tile(np.asarray(labels), len(shifted))


def load_digits(
    test_fraction: float = 0.2,
    seed: int = 0,
    dtype: Any = "float32",
    val_fraction: float = 0.0,
    augment: bool = False,
    standardize: bool = True,
) -> Dataset:
    """The UCI optical handwritten digits (as shipped by scikit-learn): 1797 images of 8×8
    pixels with values 0..16, ten classes, embedded in the package (no download).

    Stratified split; ``val_fraction`` of the training part is held out for validation.
    ``augment`` adds one-pixel shifts of the training images (``shift_digits``).  Features
    are standardised with the training mean and standard deviation; ``standardize=False``
    gives the same split with the raw 0–16 pixel values (the statistics are still on the
    Dataset, ``feature_mean`` and ``feature_std``).
    """
    with np.load(_DIGITS_PATH, allow_pickle=False) as archive:
        images = archive["images"]
        labels = archive["labels"]
    return _split_and_assemble(
        images.reshape(len(images), -1).astype(np.float64),
        labels.astype(np.int64),
        name="digits",
        task="classification",
        test_fraction=test_fraction,
        seed=seed,
        dtype=dtype,
        n_classes=10,
        val_fraction=val_fraction,
        augment=shift_digits if augment else None,
        apply_standardization=_check_flag("standardize", standardize),
    )


def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}={value!r} is not accepted; expected True or False")
    return bool(value)


def make_spirals(
    n_samples: int = 1500,
    n_classes: int = 3,
    noise: float = 0.2,
    seed: int = 0,
    test_fraction: float = 0.2,
    dtype: Any = "float32",
    val_fraction: float = 0.0,
    standardize: bool = True,
) -> Dataset:
    """Interleaved 2-D spirals, one arm per class, not linearly separable.

    Point i of arm k at t ∈ (0, 1] lies at radius r = t and angle
    θ = 2πk/K + 4t + noise·ε, ε ~ N(0, 1): x = (r sin θ, r cos θ).  The angular noise grows
    the overlap of neighbouring arms; noise=0 gives exact curves.
    """
    n_samples = check_int("n_samples", n_samples, 2 * n_classes if n_classes >= 1 else 2)
    n_classes = check_int("n_classes", n_classes, 2)
    if not noise >= 0:
        raise ValueError(f"noise={noise!r} must be >= 0")
    rng = np.random.default_rng(seed)
    counts = np.full(n_classes, n_samples // n_classes)
    counts[: n_samples % n_classes] += 1
    points, labels = [], []
    for k, count in enumerate(counts):
        t = np.linspace(0.0, 1.0, count + 1)[1:]  # t = 0 would put every arm's first point at 0
        theta = 2.0 * np.pi * k / n_classes + 4.0 * t + noise * rng.standard_normal(count)
        points.append(np.stack([t * np.sin(theta), t * np.cos(theta)], axis=1))
        labels.append(np.full(count, k, dtype=np.int64))
    return _split_and_assemble(
        np.concatenate(points),
        np.concatenate(labels),
        name="spirals",
        task="classification",
        test_fraction=test_fraction,
        seed=seed,
        dtype=dtype,
        n_classes=n_classes,
        val_fraction=val_fraction,
        apply_standardization=_check_flag("standardize", standardize),
    )


def make_regression(
    n_samples: int = 2000,
    n_features: int = 8,
    n_targets: int = 1,
    noise: float = 0.1,
    seed: int = 0,
    test_fraction: float = 0.2,
    dtype: Any = "float32",
    val_fraction: float = 0.0,
) -> Dataset:
    """Samples of a fixed random smooth function plus Gaussian noise.

    x ~ N(0, I_d); the function, drawn once from ``seed``, is a random-feature expansion
    g(x) = sin(x A + c) B / √h with A ~ N(0, 1/d), c ~ U(0, 2π), B ~ N(0, 1) and h = 32
    hidden features, so each target has variance about ½ and is smooth in x;
    y = g(x) + noise·ε.  The best achievable test MSE is therefore noise².
    Targets are returned unscaled, with shape (n_samples, n_targets).
    """
    n_samples = check_int("n_samples", n_samples, 2)
    n_features = check_int("n_features", n_features, 1)
    n_targets = check_int("n_targets", n_targets, 1)
    if not noise >= 0:
        raise ValueError(f"noise={noise!r} must be >= 0")
    rng = np.random.default_rng(seed)
    hidden = 32
    a = rng.standard_normal((n_features, hidden)) / np.sqrt(n_features)
    c = rng.uniform(0.0, 2.0 * np.pi, hidden)
    b = rng.standard_normal((hidden, n_targets))
    x = rng.standard_normal((n_samples, n_features))
    y = np.sin(x @ a + c) @ b / np.sqrt(hidden)
    y = y + noise * rng.standard_normal(y.shape)
    # x is already zero-mean, unit-variance by construction; standardising again would
    # change the function the targets were drawn from, so it is skipped.
    return _split_and_assemble(
        x,
        y,
        name="regression",
        task="regression",
        test_fraction=test_fraction,
        seed=seed,
        dtype=dtype,
        standardize_features=False,
        val_fraction=val_fraction,
    )


# -- .npz files ----------------------------------------------------------------------------------


def _as_2d_features(x: np.ndarray, what: str) -> np.ndarray:
    if x.ndim == 0:
        raise ValueError(f"{what} is a scalar; expected an array of shape (n_samples, ...)")
    if x.size == 0:
        raise ValueError(
            f"{what} is empty (shape {x.shape}); expected an array of shape (n_samples, ...) "
            "with at least one sample and one feature"
        )
    if x.ndim == 1:
        return x.reshape(-1, 1)
    return x.reshape(len(x), -1)  # images (N, H, W) become rows of H·W features


def _infer_task(y: np.ndarray, task: str | None, what: str) -> str:
    if task is None:
        if np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
            return "classification"
        if np.issubdtype(y.dtype, np.floating):
            return "regression"
        raise ValueError(f"{what} has dtype {y.dtype}; expected integer labels or float targets")
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not one of {TASKS}")
    return task


def _check_labels(y: np.ndarray, what: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:  # a column of labels, as many tools save them
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(
            f"{what} has shape {y.shape}; classification labels must be class indices of "
            "shape (N,) or (N, 1)"
        )
    if np.issubdtype(y.dtype, np.floating) and not np.all(np.isfinite(y) & (y == np.round(y))):
        raise ValueError(f"{what} holds non-integer values; class labels must be integers")
    # Compare before the cast to int64, which would wrap 2⁶³ + 5 (uint64) to a negative number.
    if y.size and y.max() > np.iinfo(np.int64).max:
        raise ValueError(
            f"{what} holds the label {int(y.max())}, larger than any class index can be; "
            "expected labels 0, 1, ..., n_classes - 1"
        )
    labels = y.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise ValueError(f"{what} holds the negative label {labels.min()}; expected 0, 1, ...")
    return labels


def _check_finite(array: np.ndarray, source: str, name: str) -> None:
    """Refuse NaN and ±Inf: standardisation would spread one of them over its whole column."""
    if not np.issubdtype(array.dtype, np.floating):
        return
    bad = ~np.isfinite(array)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        value = array[first]
        raise ValueError(
            f"{source}: {name} holds {int(bad.sum())} non-finite value(s) ({value} at index "
            f"{first}, the first); expected finite numbers (drop or impute them before loading)"
        )


def _check_pair(x: np.ndarray, y: np.ndarray, source: str, x_name: str, y_name: str) -> None:
    if len(x) != len(y):
        raise ValueError(
            f"{source}: {x_name} has {len(x)} samples but {y_name} has {len(y)}; "
            "they must have the same length"
        )
    if len(x) == 0:
        raise ValueError(f"{source}: {x_name} is empty")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{source}: {x_name} has dtype {x.dtype}; expected real numbers")
    _check_finite(x, source, x_name)
    if np.issubdtype(y.dtype, np.floating) and y.ndim >= 1:
        _check_finite(y, source, y_name)


def load_npz(
    path: str | os.PathLike,
    x_key: str = "x",
    y_key: str = "y",
    *,
    task: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    standardize_features: bool = True,
    dtype: Any = "float32",
    val_fraction: float = 0.0,
) -> Dataset:
    """Load features and labels/targets from a NumPy .npz archive (never unpickled).

    Either the archive holds ``x_train``, ``y_train``, ``x_test``, ``y_test`` (that split is
    kept), or it holds ``x_key`` and ``y_key`` and is split here with ``test_fraction`` and
    ``seed``.  Features of shape (N, ...) are flattened to (N, features).  ``task`` defaults to
    classification for integer ``y`` and regression for float ``y``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"npz data set {str(path)!r} does not exist; expected a .npz file with arrays "
            f"{x_key!r} and {y_key!r}, or x_train, y_train, x_test and y_test"
        )
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as error:
        raise ValueError(
            f"npz data set {str(path)!r} is not a readable .npz archive "
            f"({type(error).__name__}: {error}); expected a file written by numpy.savez"
        ) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise TypeError(f"{str(path)!r} holds a single array, not a .npz archive of named arrays")
    source = f"npz data set {str(path)!r}"
    with archive:
        keys = set(archive.files)
        split_keys = {"x_train", "y_train", "x_test", "y_test"}
        try:
            if split_keys <= keys:
                arrays = {key: archive[key] for key in sorted(split_keys)}
            elif x_key in keys and y_key in keys:
                arrays = {"x": archive[x_key], "y": archive[y_key]}
            else:
                raise ValueError(
                    f"{source} has arrays {sorted(keys)}; expected {x_key!r} and {y_key!r}, "
                    "or x_train, y_train, x_test and y_test"
                )
        except (zlib.error, zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
            # a damaged member of the zip: bad CRC, cut deflate stream, or a broken .npy header
            if isinstance(error, ValueError) and str(error).startswith(source):
                raise
            raise ValueError(
                f"{source} is corrupt ({type(error).__name__}: {error}); expected an archive "
                "written by numpy.savez"
            ) from None
    name = f"npz:{path.name}"
    if "x" in arrays:
        x, y = _as_2d_features(arrays["x"], x_key), arrays["y"]
        _check_pair(x, y, source, x_key, y_key)
        task = _infer_task(y, task, y_key)
        if task == "classification":
            y = _check_labels(y, f"{source}: {y_key}")
        return _split_and_assemble(
            x,
            y,
            name=name,
            task=task,
            test_fraction=test_fraction,
            seed=seed,
            dtype=dtype,
            apply_standardization=_check_flag("standardize_features", standardize_features),
            val_fraction=val_fraction,
        )
    x_train = _as_2d_features(arrays["x_train"], "x_train")
    x_test = _as_2d_features(arrays["x_test"], "x_test")
    y_train, y_test = arrays["y_train"], arrays["y_test"]
    _check_pair(x_train, y_train, source, "x_train", "y_train")
    _check_pair(x_test, y_test, source, "x_test", "y_test")
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(
            f"{source}: x_train has {x_train.shape[1]} features but x_test has {x_test.shape[1]}"
        )
    task = _infer_task(y_train, task, "y_train")
    if task == "classification":
        y_train = _check_labels(y_train, f"{source}: y_train")
        y_test = _check_labels(y_test, f"{source}: y_test")
    return _assemble(
        x_train,
        y_train,
        x_test,
        y_test,
        name=name,
        task=task,
        dtype=dtype,
        seed=seed,
        apply_standardization=_check_flag("standardize_features", standardize_features),
        val_fraction=val_fraction,
    )


# -- MNIST IDX files -----------------------------------------------------------------------------

# IDX type byte → big-endian NumPy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {dtype.newbyteorder("="): code for code, dtype in _IDX_TYPES.items()}


def _open_maybe_gzip(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


# Deflate cannot expand data by more than about 1032:1, so a gzip file of n bytes holds at most
# this many times n bytes: a header promising more is refused before anything is decompressed.
_GZIP_MAX_EXPANSION = 1100
_READ_CHUNK = 1 << 24


def _read_at_most(handle, limit: int) -> bytes:
    """Up to ``limit`` bytes from ``handle``, read in chunks (never more, whatever the file)."""
    chunks, remaining = [], limit
    while remaining > 0:
        chunk = handle.read(min(remaining, _READ_CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed, by a ``.gz`` suffix) into a native array.

    Layout: two zero bytes, a type byte (0x08 ubyte … 0x0E double), a byte with the number of
    dimensions n, n big-endian uint32 sizes, then the data, big-endian, row-major.
    Raises ValueError naming the file for a wrong magic, a truncated file or trailing bytes.
    The header is checked against the file's size before the data is read (or decompressed),
    and no more than the header's data size (plus one byte, to see trailing bytes) is read.
    """
    path = Path(path)
    where = f"IDX file {str(path)!r}"
    compressed = path.suffix == ".gz"
    try:
        file_size = path.stat().st_size
        with _open_maybe_gzip(path) as handle:
            magic = handle.read(4)
            if len(magic) < 4:
                raise ValueError(
                    f"{where} is truncated: {len(magic)} bytes, shorter than the 4-byte magic"
                )
            zero0, zero1, type_code, ndim = magic
            if zero0 != 0 or zero1 != 0 or type_code not in _IDX_TYPES:
                raise ValueError(
                    f"{where} has magic number 0x{magic.hex()}; expected 0x0000TTNN with type "
                    f"byte TT one of {[f'0x{code:02x}' for code in _IDX_TYPES]}"
                )
            header_size = 4 + 4 * ndim
            sizes = handle.read(4 * ndim)
            if len(sizes) < 4 * ndim:
                raise ValueError(
                    f"{where} is truncated: its {ndim} dimension sizes need {header_size} header "
                    f"bytes, found {4 + len(sizes)}"
                )
            shape = tuple(int.from_bytes(sizes[4 * i : 4 * i + 4], "big") for i in range(ndim))
            dtype = _IDX_TYPES[type_code]
            expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
            promised = f"header says shape {shape} of {dtype.name} = {expected} data bytes"
            if not compressed and expected > file_size - header_size:
                raise ValueError(
                    f"{where} is truncated: {promised}, found {file_size - header_size}"
                )
            if compressed and expected > file_size * _GZIP_MAX_EXPANSION:
                raise ValueError(
                    f"{where} is truncated or its header is wrong: {promised}, but a "
                    f"{file_size}-byte gzip file decompresses to at most "
                    f"{file_size * _GZIP_MAX_EXPANSION}"
                )
            raw = _read_at_most(handle, expected + 1)
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{where} is corrupt: {error}") from error
    found = len(raw)
    if found < expected:
        raise ValueError(f"{where} is truncated: {promised}, found {found}")
    if found > expected:
        raise ValueError(f"{where} has trailing bytes: {promised}, and more follow")
    data = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzip-compressed when the name ends in ``.gz``)."""
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    if native not in _IDX_CODES:
        raise ValueError(
            f"array dtype {array.dtype} has no IDX type; expected one of "
            f"{sorted(str(d) for d in _IDX_CODES)}"
        )
    if array.ndim > 255:
        raise ValueError(f"array has {array.ndim} dimensions; IDX allows at most 255")
    header = bytes([0, 0, _IDX_CODES[native], array.ndim])
    header += np.asarray(array.shape, dtype=">u4").tobytes()
    body = np.ascontiguousarray(array, dtype=native.newbyteorder(">")).tobytes()
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as handle:
        handle.write(header + body)


_MNIST_PARTS = {
    "train_images": ("train-images", "idx3-ubyte"),
    "train_labels": ("train-labels", "idx1-ubyte"),
    "test_images": ("t10k-images", "idx3-ubyte"),
    "test_labels": ("t10k-labels", "idx1-ubyte"),
}


def _find_mnist_file(directory: Path, stem: str, kind: str) -> Path:
    # Both the original names (train-images-idx3-ubyte) and the common dotted variant
    # (train-images.idx3-ubyte), each plain or gzip-compressed.
    candidates = [f"{stem}{sep}{kind}{gz}" for sep in ("-", ".") for gz in ("", ".gz")]
    for candidate in candidates:
        if (directory / candidate).is_file():
            return directory / candidate
    expected = ", ".join(f"{s}-{k}[.gz]" for s, k in _MNIST_PARTS.values())
    raise FileNotFoundError(
        f"MNIST file {str(directory / candidates[0])!r} (or {candidates[1]!r}) not found; "
        f"an MNIST directory must hold {expected}"
    )


def load_mnist_idx(
    directory: str | os.PathLike,
    dtype: Any = "float32",
    standardize_features: bool = True,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> Dataset:
    """MNIST (or Fashion-MNIST, same format) from the four IDX files in ``directory``.

    The official 60000/10000 split is kept.  Pixels 0..255 are standardised with the one
    scalar mean and standard deviation of all training pixels (per-pixel statistics would
    blow up border pixels that are almost always 0).  ``standardize_features=False`` gives
    pixels / 255 instead, and the Dataset's statistics are those of these values.
    """
    directory = Path(directory)
    if not directory.is_dir():
        expected = ", ".join(f"{s}-{k}[.gz]" for s, k in _MNIST_PARTS.values())
        raise FileNotFoundError(
            f"MNIST directory {str(directory)!r} does not exist; it must hold {expected}"
        )
    arrays = {}
    for part, (stem, kind) in _MNIST_PARTS.items():
        path = _find_mnist_file(directory, stem, kind)
        array = read_idx(path)
        want_ndim = 3 if part.endswith("images") else 1
        if array.dtype != np.uint8 or array.ndim != want_ndim:
            raise ValueError(
                f"IDX file {str(path)!r} holds {array.dtype} of shape {array.shape}; expected "
                f"ubyte with {want_ndim} dimensions (magic 0x000008{want_ndim:02x})"
            )
        arrays[part] = (path, array)
    for split in ("train", "test"):
        (image_path, images), (label_path, labels) = (
            arrays[f"{split}_images"],
            arrays[f"{split}_labels"],
        )
        if len(images) != len(labels):
            raise ValueError(
                f"MNIST {split} files disagree: {str(image_path)!r} has {len(images)} images but "
                f"{str(label_path)!r} has {len(labels)} labels"
            )
    (train_path, train_images), (test_path, test_images) = (
        arrays["train_images"],
        arrays["test_images"],
    )
    if train_images.shape[1:] != test_images.shape[1:]:
        raise ValueError(
            f"MNIST images differ in size: {str(train_path)!r} holds "
            f"{'x'.join(map(str, train_images.shape[1:]))} images but {str(test_path)!r} holds "
            f"{'x'.join(map(str, test_images.shape[1:]))}; expected one size for both"
        )
    for part in ("train_labels", "test_labels"):
        path, labels = arrays[part]
        if labels.size and labels.max() > 9:
            raise ValueError(
                f"IDX file {str(path)!r} holds the label {int(labels.max())}; MNIST labels are "
                "the classes 0..9"
            )
    x_train = arrays["train_images"][1].reshape(len(arrays["train_images"][1]), -1)
    x_test = arrays["test_images"][1].reshape(len(arrays["test_images"][1]), -1)
    y_train = arrays["train_labels"][1].astype(np.int64)
    y_test = arrays["test_labels"][1].astype(np.int64)
    if not _check_flag("standardize_features", standardize_features):
        x_train, x_test = x_train / 255.0, x_test / 255.0
    return _assemble(
        x_train,
        y_train,
        x_test,
        y_test,
        name=f"mnist:{directory.name}",
        task="classification",
        dtype=dtype,
        apply_standardization=standardize_features,
        per_feature=False,
        n_classes=10,
        val_fraction=val_fraction,
        seed=seed,
    )


# -- by name, for the command line ---------------------------------------------------------------


def load_dataset(
    name: str = "digits",
    *,
    seed: int = 0,
    dtype: Any = "float32",
    val_fraction: float = 0.0,
    augment: bool = False,
    standardize: bool = True,
) -> Dataset:
    """Load a data set by its command-line name: "digits" (default), "spirals", "regression",
    "npz:PATH" or "mnist:DIR".  ``seed`` fixes the splits (and the synthetic samples);
    ``val_fraction`` holds out part of the training data; ``augment`` is for digits only;
    ``standardize=False`` leaves the features unstandardised (the statistics are still
    recorded on the Dataset)."""
    text = str(name).strip()
    lowered = text.lower()
    if augment and lowered != "digits":
        raise ValueError(f"augment=True is only available for dataset 'digits', not {name!r}")
    common = {"seed": seed, "dtype": dtype, "val_fraction": val_fraction}
    standardize = _check_flag("standardize", standardize)
    if lowered == "digits":
        return load_digits(augment=augment, standardize=standardize, **common)
    if lowered == "spirals":
        return make_spirals(standardize=standardize, **common)
    if lowered == "regression":
        return make_regression(**common)  # x ~ N(0, I) by construction: never standardised
    if lowered.startswith("npz:") and len(text) > 4:
        return load_npz(text[4:], standardize_features=standardize, **common)
    if lowered.startswith("mnist:") and len(text) > 6:
        return load_mnist_idx(text[6:], standardize_features=standardize, **common)
    raise ValueError(f"dataset={name!r} is not a data set; expected one of {DATASET_NAMES}")
