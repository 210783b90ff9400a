"""Datasets as uint8 HWC arrays with deterministic train / validation / test splits.

Sources: ``digits`` (scikit-learn's bundled 8x8 digits, always available), ``fashion_mnist`` (Keras cache,
then the Debian package ``dataset-fashion-mnist``, then a Keras download), and a user path: a ``.npz`` file
or a directory of images in one sub-directory per class.
"""
from __future__ import annotations

import dataclasses
import gzip
import os
from pathlib import Path

import numpy as np

from tfbitmeta.errors import BadArgument, DataMissing

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
FASHION_DIRS = [Path.home() / ".keras" / "datasets" / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist")]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}


@dataclasses.dataclass
class Splits:
    name: str
    x_train: np.ndarray  # uint8 (N, H, W, C)
    y_train: np.ndarray  # int32 (N,)
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    def limit_train(self, n: int | None) -> "Splits":
        if n is None or n >= len(self.x_train):
            return self
        return dataclasses.replace(self, x_train=self.x_train[:n], y_train=self.y_train[:n])


def _hwc_uint8(x: np.ndarray) -> np.ndarray:
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataMissing(f"images must be (N, H, W) or (N, H, W, C) arrays, got shape {x.shape}")
    if x.dtype != np.uint8:
        x = np.asarray(x, np.float64)
        hi = 1.0 if x.max() <= 1.0 else 255.0
        x = np.clip(np.round(x / hi * 255.0), 0, 255).astype(np.uint8)
    return x


def _split(x, y, seed, val_fraction, test_fraction=0.0):
    """Seeded shuffle then cut into (train, val[, test]); the same seed always gives the same split."""
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    n_val = int(round((len(x) - n_test) * val_fraction))
    test, val, train = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
    return (x[train], y[train]), (x[val], y[val]), (x[test], y[test])


def load_digits(seed: int = 0, val_fraction: float = 0.1) -> Splits:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = np.clip(np.round(d.images / 16.0 * 255.0), 0, 255).astype(np.uint8)[..., None]
    y = d.target.astype(np.int32)
    (xtr, ytr), (xv, yv), (xte, yte) = _split(x, y, seed, val_fraction, test_fraction=0.2)
    return Splits("digits", xtr, ytr, xv, yv, xte, yte, [str(i) for i in range(10)])


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        buf = f.read()
    nd = buf[3]
    shape = tuple(int.from_bytes(buf[4 + 4 * i:8 + 4 * i], "big") for i in range(nd))
    return np.frombuffer(buf, np.uint8, offset=4 + 4 * nd).reshape(shape)


FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz")


def _fashion_arrays():
    for d in FASHION_DIRS:
        if all((d / f).is_file() for f in FASHION_FILES):
            return [_read_idx(d / f) for f in FASHION_FILES]
    try:  # last resort: Keras downloads into ~/.keras (fails without internet)
        import tensorflow as tf

        (xtr, ytr), (xte, yte) = tf.keras.datasets.fashion_mnist.load_data()
        return xtr, ytr, xte, yte
    except Exception as e:  # noqa: BLE001 -- any download failure gets the same advice
        raise DataMissing(
            "Fashion-MNIST not found in ~/.keras/datasets/fashion-mnist or /usr/share/datasets/fashion-mnist and "
            f"the download failed ({type(e).__name__}); install it with `apt-get install dataset-fashion-mnist`"
        ) from None


def load_fashion_mnist(seed: int = 0, val_size: int = 5000) -> Splits:
    xtr, ytr, xte, yte = _fashion_arrays()
    (xt, yt), (xv, yv), _ = _split(_hwc_uint8(xtr), ytr.astype(np.int32), seed, val_size / len(xtr))
    return Splits("fashion_mnist", xt, yt, xv, yv, _hwc_uint8(xte), yte.astype(np.int32), list(FASHION_CLASSES))


def load_npz(path: Path, seed: int = 0, val_fraction: float = 0.1) -> Splits:
    """``.npz`` with ``x_train, y_train[, x_test, y_test][, class_names]`` or just ``x, y``."""
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise DataMissing(f"cannot read {path}: {e}") from None
    keys = set(z.files)
    if {"x_train", "y_train"} <= keys:
        x, y = _hwc_uint8(z["x_train"]), z["y_train"].astype(np.int32)
        if {"x_test", "y_test"} <= keys:
            (xt, yt), (xv, yv), _ = _split(x, y, seed, val_fraction)
            xte, yte = _hwc_uint8(z["x_test"]), z["y_test"].astype(np.int32)
        else:
            (xt, yt), (xv, yv), (xte, yte) = _split(x, y, seed, val_fraction, 0.2)
    elif {"x", "y"} <= keys:
        (xt, yt), (xv, yv), (xte, yte) = _split(_hwc_uint8(z["x"]), z["y"].astype(np.int32), seed, val_fraction, 0.2)
    else:
        raise DataMissing(f"{path} must contain arrays x_train/y_train (optionally x_test/y_test) or x/y; "
                             f"found {sorted(keys)}")
    n = int(max(yt.max(), yte.max())) + 1
    names = [str(c) for c in z["class_names"]] if "class_names" in keys else [str(i) for i in range(n)]
    return Splits(path.stem, xt, yt, xv, yv, xte, yte, names)


def load_image_folder(path: Path, seed: int = 0, val_fraction: float = 0.1) -> Splits:
    """``path/<class>/*.png``; a ``train``/``test`` sub-directory pair is used as the official split."""
    from PIL import Image

    def read(root: Path, classes):
        xs, ys = [], []
        for i, c in enumerate(classes):
            for f in sorted((root / c).iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    xs.append(np.asarray(Image.open(f)))
                    ys.append(i)
        if not xs:
            raise DataMissing(f"no images found under {root} (expected {root}/<class>/*.png)")
        shapes = {a.shape for a in xs}
        if len(shapes) != 1:
            raise DataMissing(f"images under {root} have different shapes {sorted(shapes)[:3]}...; resize them first")
        return _hwc_uint8(np.stack(xs)), np.asarray(ys, np.int32)

    if (path / "train").is_dir() and (path / "test").is_dir():
        classes = sorted(p.name for p in (path / "train").iterdir() if p.is_dir())
        x, y = read(path / "train", classes)
        (xt, yt), (xv, yv), _ = _split(x, y, seed, val_fraction)
        xte, yte = read(path / "test", classes)
    else:
        classes = sorted(p.name for p in path.iterdir() if p.is_dir())
        if not classes:
            raise DataMissing(f"{path} has no class sub-directories (expected {path}/<class>/*.png)")
        (xt, yt), (xv, yv), (xte, yte) = _split(*read(path, classes), seed, val_fraction, 0.2)
    return Splits(path.name, xt, yt, xv, yv, xte, yte, classes)


BUILTIN = {"digits": load_digits, "fashion_mnist": load_fashion_mnist}


def load(name: str, seed: int = 0) -> Splits:
    """Load a built-in dataset by name, or a user dataset from a ``.npz`` file or an image directory."""
    if name in BUILTIN:
        return BUILTIN[name](seed=seed)
    p = Path(os.path.expanduser(name))
    if p.suffix == ".npz" and p.is_file():
        return load_npz(p, seed=seed)
    if p.is_dir():
        return load_image_folder(p, seed=seed)
    raise BadArgument(f"unknown dataset {name!r}: use {', '.join(BUILTIN)}, a .npz file or an image directory",
                      param="dataset")
