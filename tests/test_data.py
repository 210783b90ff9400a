import numpy as np
import pytest
from PIL import Image

from tfbitmeta.data import Normalization, datasets
from tfbitmeta.data.pipeline import epoch_order, train_batches
from tfbitmeta.errors import TfbitmetaError


def test_digits_splits_are_deterministic_and_disjoint():
    a, b = datasets.load("digits", seed=3), datasets.load("digits", seed=3)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert len(a.x_train) + len(a.x_val) + len(a.x_test) == 1797
    c = datasets.load("digits", seed=4)
    assert not np.array_equal(a.y_train[:50], c.y_train[:50])
    assert a.x_train.dtype == np.uint8 and a.image_shape == (8, 8, 1)


def test_npz_and_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 255, size=(50, 10, 10), dtype=np.uint8), np.arange(50) % 5
    np.savez(tmp_path / "toy.npz", x=x, y=y)
    s = datasets.load(str(tmp_path / "toy.npz"))
    assert s.num_classes == 5 and s.image_shape == (10, 10, 1)
    for c in range(3):
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, size=(12, 12, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"c{c}" / f"{i}.png")
    s = datasets.load(str(tmp_path / "imgs"))
    assert s.class_names == ["c0", "c1", "c2"] and s.image_shape == (12, 12, 3)
    assert len(s.x_train) + len(s.x_val) + len(s.x_test) == 30
    with pytest.raises(TfbitmetaError, match="unknown dataset"):
        datasets.load("cifar11")


def test_missing_fashion_mnist_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "FASHION_DIRS", [tmp_path])
    import tensorflow as tf

    def no_download():
        raise OSError("no network")
    monkeypatch.setattr(tf.keras.datasets.fashion_mnist, "load_data", no_download)
    with pytest.raises(TfbitmetaError, match="apt-get install dataset-fashion-mnist"):
        datasets.load("fashion_mnist")


def test_normalization_and_resumable_order():
    s = datasets.load("digits")
    norm = Normalization.fit(s.x_train, (16, 16))
    x = norm.apply(s.x_train[:256]).numpy()
    assert x.shape == (256, 16, 16, 1)
    assert abs(x.mean()) < 0.2 and 0.8 < x.std() < 1.2
    assert Normalization.from_dict(norm.to_dict()) == norm
    full = [yb.numpy() for _, yb in train_batches(s.x_train, s.y_train, norm, 32, seed=1, epoch=2)]
    tail = [yb.numpy() for _, yb in train_batches(s.x_train, s.y_train, norm, 32, seed=1, epoch=2, start_batch=5)]
    assert len(tail) == len(full) - 5
    for a, b in zip(full[5:], tail):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(epoch_order(100, 1, 0), epoch_order(100, 1, 1))
