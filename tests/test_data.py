"""Data sets and loaders: fixed splits, train-only standardisation, IDX and .npz parsing."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from gpubackprop import data


def _rows(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in np.ascontiguousarray(x)}


# -- splits --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_samples", [2, 7, 33, 129])
@pytest.mark.parametrize("stratified", [False, True])
def test_split_is_a_partition_and_reproducible(n_samples, stratified):
    rng = np.random.default_rng(n_samples)
    labels = rng.integers(0, 3, n_samples) if stratified else None
    train, test = data.train_test_split(n_samples, 0.25, seed=5, labels=labels)
    assert len(np.intersect1d(train, test)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(n_samples))
    assert len(train) >= 1 and len(test) >= 1
    again = data.train_test_split(n_samples, 0.25, seed=5, labels=labels)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])


def test_split_depends_on_seed_and_is_stratified():
    labels = np.repeat(np.arange(4), [40, 80, 20, 60])
    train_a, test_a = data.train_test_split(len(labels), 0.25, seed=0, labels=labels)
    _, test_b = data.train_test_split(len(labels), 0.25, seed=1, labels=labels)
    assert not np.array_equal(np.sort(test_a), np.sort(test_b))
    assert np.array_equal(np.bincount(labels[test_a]), [10, 20, 5, 15])
    # shuffled, not grouped by class
    assert not np.all(np.diff(labels[train_a]) >= 0)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        data.train_test_split(10, fraction, seed=0)


# -- digits --------------------------------------------------------------------------------------


def test_digits_shapes_and_reproducible_disjoint_split():
    a = data.load_digits()
    b = data.load_digits()
    assert a.x_train.shape == (1438, 64) and a.x_test.shape == (359, 64)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int64
    assert a.n_classes == 10 and a.task == "classification" and a.name == "digits"
    assert a.n_features == 64 and a.n_outputs == 10
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert set(np.unique(a.y_test)) == set(range(10))
    # Every class keeps its share of the test set (stratified): 17 to 19 of ~180 each.
    counts = np.bincount(a.y_test, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 37
    other = data.load_digits(seed=1)
    assert not np.array_equal(a.y_test, other.y_test)


def test_digits_split_matches_raw_data_and_is_disjoint():
    raw = np.load(data._DIGITS_PATH)
    images = raw["images"].astype(np.float64)
    ds = data.load_digits(dtype="float64")
    # Undo the standardisation with the statistics of the training rows the loader used.
    train_idx, test_idx = data.train_test_split(len(images), 0.2, 0, labels=raw["labels"])
    mean = images[train_idx].mean(axis=0)
    std = images[train_idx].std(axis=0)
    std[std == 0] = 1.0
    np.testing.assert_allclose(ds.x_train * std + mean, images[train_idx], atol=1e-9)
    np.testing.assert_allclose(ds.x_test * std + mean, images[test_idx], atol=1e-9)
    assert np.array_equal(ds.y_train, raw["labels"][train_idx])
    assert len(np.intersect1d(train_idx, test_idx)) == 0


def test_digits_standardised_with_train_statistics():
    ds = data.load_digits(dtype="float64")
    mean = ds.x_train.mean(axis=0)
    std = ds.x_train.std(axis=0)
    np.testing.assert_allclose(mean, 0.0, atol=1e-12)
    constant = std < 1e-12  # features that are 0 in every training image map to 0, not NaN
    assert constant.any()
    np.testing.assert_allclose(std[~constant], 1.0, rtol=1e-12)
    assert np.all(ds.x_train[:, constant] == 0)
    assert np.all(np.isfinite(ds.x_test))
    # the test part is standardised with the train statistics, so its own are not exactly 0/1
    assert np.abs(ds.x_test.mean(axis=0)[~constant]).max() > 1e-3


def test_digits_validation_split():
    full = data.load_digits(dtype="float64")
    ds = data.load_digits(dtype="float64", val_fraction=0.1)
    assert len(ds.x_val) == 143 and len(ds.x_train) == 1438 - 143
    assert np.array_equal(ds.y_test, full.y_test)  # the test set does not move
    # train statistics only: the train part is exactly standardised, validation is not
    np.testing.assert_allclose(ds.x_train.mean(axis=0), 0.0, atol=1e-12)
    assert np.abs(ds.x_val.mean(axis=0)).max() > 1e-3
    assert not _rows(ds.x_train) & _rows(ds.x_val)
    counts = np.bincount(ds.y_val, minlength=10)
    assert counts.min() >= 13 and counts.max() <= 16  # stratified: ~14.3 per class
    with pytest.raises(ValueError, match="val_fraction"):
        data.load_digits(val_fraction=1.0)


def test_shift_digits_moves_pixels_by_one():
    image = np.zeros((8, 8), dtype=np.uint8)
    image[0, 3] = 5  # top row: shifting up pushes it out of the image
    image[4, 7] = 9  # right column: shifting right pushes it out
    shifted, labels = data.shift_digits(image.reshape(1, 64), np.array([7]))
    grids = shifted.reshape(5, 8, 8)
    assert labels.tolist() == [7] * 5
    assert np.array_equal(grids[0], image)
    down, up, right, left = grids[1:]
    assert down[1, 3] == 5 and down[5, 7] == 9 and down.sum() == 14
    assert up[3, 7] == 9 and up.sum() == 9  # the top-row pixel left the image (no wrap-around)
    assert right[0, 4] == 5 and right.sum() == 5
    assert left[0, 2] == 5 and left[4, 6] == 9 and left.sum() == 14


def test_digits_augmentation_touches_training_rows_only():
    plain = data.load_digits(dtype="float64", val_fraction=0.1)
    augmented = data.load_digits(dtype="float64", val_fraction=0.1, augment=True)
    assert len(augmented.x_train) == 5 * len(plain.x_train)
    assert np.array_equal(augmented.y_train, np.tile(plain.y_train, 5))
    assert np.array_equal(augmented.y_val, plain.y_val)
    assert np.array_equal(augmented.y_test, plain.y_test)
    assert len(augmented.x_val) == len(plain.x_val) and len(augmented.x_test) == 359
    np.testing.assert_allclose(augmented.x_train.mean(axis=0), 0.0, atol=1e-12)
    with pytest.raises(ValueError, match="only available for dataset 'digits'"):
        data.load_dataset("spirals", augment=True)


def test_digits_rejects_bad_dtype():
    with pytest.raises(ValueError, match="dtype"):
        data.load_digits(dtype="int32")


# -- synthetic -----------------------------------------------------------------------------------


def test_spirals_are_balanced_reproducible_and_not_linearly_separable():
    ds = data.make_spirals(n_samples=301, n_classes=4, noise=0.1, seed=3)
    assert ds.x_train.shape[1] == 2 and len(ds.x_train) + len(ds.x_test) == 301
    assert ds.n_classes == 4 and ds.task == "classification"
    assert np.array_equal(np.bincount(np.concatenate([ds.y_train, ds.y_test])), [76, 75, 75, 75])
    again = data.make_spirals(n_samples=301, n_classes=4, noise=0.1, seed=3)
    assert np.array_equal(ds.x_train, again.x_train)
    assert not _rows(ds.x_train) & _rows(ds.x_test)
    # Not linearly separable (a least-squares linear classifier is poor), yet the classes are
    # well separated locally (1-nearest-neighbour gets nearly every test point).
    design = np.c_[ds.x_train, np.ones(len(ds.x_train))]
    weights = np.linalg.lstsq(design, np.eye(4)[ds.y_train], rcond=None)[0]
    linear = np.argmax(np.c_[ds.x_test, np.ones(len(ds.x_test))] @ weights, axis=1)
    assert (linear == ds.y_test).mean() < 0.7
    distances = ((ds.x_test[:, None, :] - ds.x_train[None, :, :]) ** 2).sum(axis=-1)
    assert (ds.y_train[distances.argmin(axis=1)] == ds.y_test).mean() > 0.9


def test_spirals_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_classes"):
        data.make_spirals(n_samples=100, n_classes=1)
    with pytest.raises(ValueError, match="noise"):
        data.make_spirals(noise=-1.0)


def test_regression_targets_are_a_fixed_function_of_x_plus_the_asked_noise():
    ds = data.make_regression(n_samples=500, n_features=5, n_targets=3, noise=0.0, seed=2)
    assert ds.task == "regression" and ds.n_classes == 0 and ds.n_outputs == 3
    assert ds.y_train.shape == (400, 3) and ds.y_test.shape == (100, 3)
    assert ds.y_train.dtype == np.float32
    # A fixed smooth function of x: identical x give identical y, and y depends on x.
    again = data.make_regression(n_samples=500, n_features=5, n_targets=3, noise=0.0, seed=2)
    assert np.array_equal(ds.y_train, again.y_train)
    assert ds.y_train.std() > 0.1
    noisy = data.make_regression(n_samples=500, n_features=5, n_targets=3, noise=0.5, seed=2)
    residual = noisy.y_train.astype(np.float64) - ds.y_train
    assert 0.4 < residual.std() < 0.6


# -- IDX -----------------------------------------------------------------------------------------


def _idx_bytes(type_code: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    header = bytes([0, 0, type_code, len(shape)])
    for size in shape:
        header += size.to_bytes(4, "big")
    return header + payload


def test_read_idx_parses_handwritten_bytes(tmp_path):
    # 2×3 big-endian int16 written byte by byte, independent of write_idx
    values = [1, -2, 300, 4, -32768, 32767]
    payload = b"".join(v.to_bytes(2, "big", signed=True) for v in values)
    path = tmp_path / "a.idx"
    path.write_bytes(_idx_bytes(0x0B, (2, 3), payload))
    array = data.read_idx(path)
    assert array.dtype == np.int16 and array.dtype.isnative
    assert array.tolist() == [[1, -2, 300], [4, -32768, 32767]]


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, dtype, suffix):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((7, 3, 5)) * 50).astype(dtype)
    path = tmp_path / f"x.idx{suffix}"
    data.write_idx(path, array)
    if suffix:
        assert path.read_bytes()[:2] == b"\x1f\x8b"  # really compressed
    back = data.read_idx(path)
    assert back.dtype == np.dtype(dtype) and np.array_equal(back, array)


def test_read_idx_wrong_magic(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x01\x02\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match=r"magic number 0x01020801.*expected"):
        data.read_idx(path)
    path.write_bytes(b"\x00\x00\x07\x01" + (3).to_bytes(4, "big") + b"abc")  # unknown type byte
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(path)


def test_read_idx_truncated_and_trailing(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(_idx_bytes(0x08, (4, 5), bytes(19)))
    with pytest.raises(ValueError, match=r"truncated.*\(4, 5\).*20 data bytes, found 19"):
        data.read_idx(path)
    path.write_bytes(_idx_bytes(0x08, (4, 5), bytes(21)))
    with pytest.raises(ValueError, match="trailing bytes"):
        data.read_idx(path)
    path.write_bytes(b"\x00\x00\x08\x03\x00\x00")  # header cut inside the sizes
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(path)
    path.write_bytes(b"\x00")
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(path)


def test_read_idx_corrupt_gzip(tmp_path):
    path = tmp_path / "x.gz"
    good = gzip.compress(_idx_bytes(0x08, (100,), bytes(range(100))))
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        data.read_idx(path)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=str(path.name)):
        data.read_idx(path)


def _write_mnist(directory, n_train=12, n_test=5, gz=False, dotted=False):
    rng = np.random.default_rng(1)
    arrays = {
        "train-images": rng.integers(0, 256, (n_train, 4, 3), dtype=np.uint8),
        "train-labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images": rng.integers(0, 256, (n_test, 4, 3), dtype=np.uint8),
        "t10k-labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for stem, array in arrays.items():
        kind = "idx3-ubyte" if array.ndim == 3 else "idx1-ubyte"
        name = f"{stem}{'.' if dotted else '-'}{kind}{'.gz' if gz else ''}"
        data.write_idx(directory / name, array)
    return arrays


@pytest.mark.parametrize(("gz", "dotted"), [(False, False), (True, False), (False, True)])
def test_load_mnist_idx(tmp_path, gz, dotted):
    arrays = _write_mnist(tmp_path, gz=gz, dotted=dotted)
    ds = data.load_mnist_idx(tmp_path, dtype="float64")
    assert ds.x_train.shape == (12, 12) and ds.x_test.shape == (5, 12)
    assert np.array_equal(ds.y_train, arrays["train-labels"])
    assert np.array_equal(ds.y_test, arrays["t10k-labels"])
    assert ds.n_classes == 10
    # one scalar mean/std of the training pixels
    pixels = arrays["train-images"].astype(np.float64)
    expected = (arrays["t10k-images"].reshape(5, -1) - pixels.mean()) / pixels.std()
    np.testing.assert_allclose(ds.x_test, expected, rtol=1e-12)
    assert data.load_dataset(f"mnist:{tmp_path}").x_train.dtype == np.float32


def test_load_mnist_idx_missing_file(tmp_path):
    _write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte.*must hold"):
        data.load_mnist_idx(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_mnist_idx(tmp_path / "nowhere")


def test_load_mnist_idx_mismatched_lengths(tmp_path):
    _write_mnist(tmp_path)
    data.write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(11, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"12 images but .* 11 labels"):
        data.load_mnist_idx(tmp_path)


def test_load_mnist_idx_wrong_kind_of_file(tmp_path):
    _write_mnist(tmp_path)
    # labels stored as images: a valid IDX file, but not what the name promises
    data.write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros((12, 1, 1), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.*expected ubyte with 1"):
        data.load_mnist_idx(tmp_path)


# -- npz -----------------------------------------------------------------------------------------


def test_load_npz_x_y_classification(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 2, 3))
    y = rng.integers(0, 4, 50)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y)
    ds = data.load_npz(path, seed=4)
    assert ds.task == "classification" and ds.n_classes == 4
    assert ds.x_train.shape == (40, 6) and ds.x_test.shape == (10, 6)
    np.testing.assert_allclose(ds.x_train.mean(axis=0), 0.0, atol=1e-6)
    assert data.load_dataset(f"npz:{path}").x_train.shape == (40, 6)


def test_load_npz_accepts_a_column_of_labels_and_rejects_other_shapes(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 5))
    y = rng.integers(0, 3, 30)
    np.savez(tmp_path / "column.npz", x=x, y=y[:, None])
    np.savez(tmp_path / "flat.npz", x=x, y=y)
    column = data.load_npz(tmp_path / "column.npz", seed=2)
    flat = data.load_npz(tmp_path / "flat.npz", seed=2)
    assert column.y_train.shape == (24,)
    np.testing.assert_array_equal(column.y_train, flat.y_train)
    np.testing.assert_array_equal(column.y_test, flat.y_test)
    np.savez(tmp_path / "wide.npz", x=x, y=np.stack([y, y], axis=1))
    with pytest.raises(ValueError, match=r"shape \(30, 2\).*\(N,\) or \(N, 1\)"):
        data.load_npz(tmp_path / "wide.npz")


def test_load_npz_custom_keys_regression_and_presplit(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "r.npz"
    np.savez(path, features=rng.standard_normal((20, 3)), targets=rng.standard_normal(20))
    ds = data.load_npz(path, x_key="features", y_key="targets", standardize_features=False)
    assert ds.task == "regression" and ds.y_train.shape == (16, 1)
    split = tmp_path / "s.npz"
    x_train, x_test = rng.standard_normal((9, 2)), rng.standard_normal((4, 2))
    np.savez(
        split,
        x_train=x_train,
        y_train=np.arange(9) % 3,
        x_test=x_test,
        y_test=np.array([0, 1, 2, 2]),
    )
    ds = data.load_npz(split, standardize_features=False, dtype="float64")
    assert np.array_equal(ds.x_train, x_train) and np.array_equal(ds.x_test, x_test)
    assert ds.n_classes == 3


def test_load_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.npz.*expected a \.npz"):
        data.load_npz(tmp_path / "missing.npz")
    path = tmp_path / "d.npz"
    np.savez(path, a=np.zeros((3, 2)), b=np.zeros(3))
    with pytest.raises(ValueError, match=r"has arrays \['a', 'b'\]; expected 'x' and 'y'"):
        data.load_npz(path)
    np.savez(path, x=np.zeros((5, 2)), y=np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="x has 5 samples but y has 4"):
        data.load_npz(path)
    np.savez(path, x=np.zeros((5, 2)), y=np.array([0, 1, -1, 0, 1]))
    with pytest.raises(ValueError, match="negative label"):
        data.load_npz(path)
    np.savez(path, x=np.zeros((5, 2)), y=np.zeros(5, dtype=np.int64))
    with pytest.raises(ValueError, match="task="):
        data.load_npz(path, task="clustering")
    garbage = tmp_path / "g.npz"
    garbage.write_bytes(b"this is not an archive")
    with pytest.raises(ValueError, match=r"g\.npz.*not a readable \.npz"):
        data.load_npz(garbage)


# -- by name ---------------------------------------------------------------------------------------


def test_validation_split_for_every_source(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.arange(80.0).reshape(40, 2), y=np.arange(40) % 2)
    _write_mnist(tmp_path, n_train=60)
    for name in ("spirals", "regression", f"npz:{tmp_path / 'd.npz'}", f"mnist:{tmp_path}"):
        ds = data.load_dataset(name, val_fraction=0.25)
        plain = data.load_dataset(name)
        assert len(ds.x_val) + len(ds.x_train) == len(plain.x_train), name
        # stratified per class (at least one per class), so only about a quarter
        assert 0.2 * len(plain.x_train) <= len(ds.x_val) <= 0.4 * len(plain.x_train), name
        assert len(ds.y_val) == len(ds.x_val)
        assert np.array_equal(ds.y_test, plain.y_test), name


def test_load_dataset_names():
    assert data.load_dataset().name == "digits"
    assert data.load_dataset("spirals").task == "classification"
    assert data.load_dataset("regression", dtype="float64").y_train.dtype == np.float64
    with pytest.raises(ValueError, match=r"'cifar'.*digits.*npz:PATH.*mnist:DIR"):
        data.load_dataset("cifar")
    with pytest.raises(ValueError, match="expected one of"):
        data.load_dataset("npz:")


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_refuses_absurd_dims_before_reading(tmp_path, suffix):
    # 65536⁴ overflows int64 (to 0): the size must be computed exactly, and refused by the file
    # size, not reached by reshaping or by decompressing.
    path = tmp_path / f"huge.idx{suffix}"
    raw = _idx_bytes(0x08, (65535, 65535, 65535, 65535), bytes(64))
    path.write_bytes(gzip.compress(raw) if suffix else raw)
    with pytest.raises(ValueError, match=r"huge\.idx.*truncated.*\(65535, 65535, 65535, 65535\)"):
        data.read_idx(path)


def test_read_idx_gzip_bomb_is_refused_with_bounded_memory(tmp_path):
    # 256 MiB of zeros compress to about 256 KiB; the header claims 16 MiB: the reader must stop
    # at the header's size (plus one byte), not inflate all 256 MiB first.
    import tracemalloc

    path = tmp_path / "bomb.idx.gz"
    with gzip.open(path, "wb", compresslevel=9) as handle:
        handle.write(_idx_bytes(0x08, (16, 1024, 1024), b""))
        zeros = bytes(1 << 24)
        for _ in range(16):
            handle.write(zeros)
    assert path.stat().st_size < 2**20
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"bomb\.idx\.gz' has trailing bytes"):
            data.read_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100 * 2**20, f"read_idx held {peak / 2**20:.0f} MiB"
