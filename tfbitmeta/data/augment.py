"""Handwriting augmentation: small random affine warps of stroke images (training classes only).

A drawer writes the same character slightly shifted, rotated, scaled and slanted; the warp imitates that, so
meta-training sees more than the 20 drawings of each training character.  Per image, independently:

* rotation uniform in ``±rotate_deg`` degrees,
* isotropic scale uniform in ``[1 - scale, 1 + scale]``,
* shear (slant) uniform in ``±shear``,
* translation uniform in ``±shift`` pixels on each axis,

about the image centre, bilinear interpolation, zero (background) fill.  The parameters of a batch depend only on
``(seed, index)``, so a resumed run sees the very images an uninterrupted one would.  Evaluation never augments:
validation and test episodes are the drawings as they are.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class AffineJitter:
    rotate_deg: float = 10.0
    scale: float = 0.1
    shear: float = 0.1
    shift: float = 2.0

    def matrices(self, n: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        """(n, 8) output->input projective transforms (the ``ImageProjectiveTransform`` convention)."""
        theta = np.deg2rad(rng.uniform(-self.rotate_deg, self.rotate_deg, n))
        s = rng.uniform(1 - self.scale, 1 + self.scale, n)
        sh = rng.uniform(-self.shear, self.shear, n)
        t = rng.uniform(-self.shift, self.shift, (n, 2))
        cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
        out = np.zeros((n, 8), np.float32)
        for i in range(n):
            c, si = np.cos(theta[i]), np.sin(theta[i])
            fwd = s[i] * np.array([[c, -si], [si, c]]) @ np.array([[1.0, sh[i]], [0.0, 1.0]])  # (x, y) -> (x', y')
            inv = np.linalg.inv(fwd)
            centre = np.array([cx, cy])
            offset = centre - inv @ (centre + t[i])  # input = inv @ (output - centre - t) + centre
            out[i] = [inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1], 0.0, 0.0]
        return out

    def __call__(self, images, seed: int, index: int) -> tf.Tensor:
        """uint8 or float (N, H, W, C) -> float32 warped pixel values (same range), deterministic per (seed, index)."""
        x = tf.cast(images, tf.float32)
        n, h, w = int(x.shape[0]), int(x.shape[1]), int(x.shape[2])
        rng = np.random.default_rng([seed, index, 7])
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=x, transforms=tf.constant(self.matrices(n, h, w, rng)), output_shape=tf.constant([h, w]),
            fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")
