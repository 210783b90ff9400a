"""tf.data pipelines and the input normalization recorded with every checkpoint.

The model always sees ``(resize(x_uint8) / 255 - mean) / std`` per channel; :class:`Normalization` is saved in
the run's config so export and the app apply the very same transform.  Training batches follow a permutation
drawn from ``(seed, epoch)``, so a resumed run sees exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf


@dataclasses.dataclass
class Normalization:
    mean: list[float]
    std: list[float]
    image_size: list[int]  # (H, W) the model sees; the source is resized bilinearly if different
    input_dtype: str = "uint8"
    input_scale: float = 1.0 / 255.0

    @classmethod
    def fit(cls, x_uint8: np.ndarray, image_size=None) -> "Normalization":
        x = x_uint8.astype(np.float32) / 255.0
        # a whole pixel value: the normalized image's zero is then a pixel value, so a 'same' first conv's zero
        # padding is exactly the export's pad with the mean pixel (docs/export.md, "First layer")
        mean = np.round(x.mean(axis=(0, 1, 2)) * 255.0) / 255.0
        std = np.maximum(x.std(axis=(0, 1, 2)), 1e-3)
        size = list(image_size) if image_size else list(x_uint8.shape[1:3])
        return cls([float(m) for m in mean], [float(s) for s in std], [int(s) for s in size])

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)

    def pixels(self, x_uint8):
        """uint8 (N, H, W, C) -> float32 pixel values at ``image_size`` (bilinear resize rounded back to whole
        pixel values, as a device resizing a uint8 bitmap would).  This is what exported front ends take."""
        x = tf.cast(x_uint8, tf.float32)
        if list(x.shape[1:3]) != list(self.image_size):
            x = tf.clip_by_value(tf.round(tf.image.resize(x, self.image_size, method="bilinear")), 0.0, 255.0)
        return x

    def apply(self, x_uint8):
        """uint8 (N, H, W, C) tensor -> normalized float32 at ``image_size``: ``(pixels * scale - mean) / std``."""
        return (self.pixels(x_uint8) * self.input_scale - tf.constant(self.mean)) / tf.constant(self.std)

    def model_input_shape(self, channels: int) -> tuple[int, int, int]:
        return (int(self.image_size[0]), int(self.image_size[1]), int(channels))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def train_batches(x, y, norm: Normalization, batch_size: int, seed: int, epoch: int, start_batch: int = 0):
    """One epoch of shuffled training batches (drop remainder), starting at batch ``start_batch``."""
    order = epoch_order(len(x), seed, epoch)
    n_batches = len(x) // batch_size
    idx = order[: n_batches * batch_size].reshape(n_batches, batch_size)[start_batch:]
    ds = tf.data.Dataset.from_tensor_slices(idx)
    xt, yt = tf.constant(x), tf.constant(y)
    ds = ds.map(lambda i: (norm.apply(tf.gather(xt, i)), tf.gather(yt, i)), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(2)


def eval_batches(x, y, norm: Normalization, batch_size: int = 256):
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    return ds.map(lambda a, b: (norm.apply(a), b), num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)
