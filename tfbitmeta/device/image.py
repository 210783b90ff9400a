"""Photo -> the pixel tensor a front end takes (whole pixel values 0-255 at the model's image size)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tfbitmeta.errors import TfbitmetaError


def load_pixels(path: Path, manifest: dict) -> np.ndarray:
    """float32 (H, W, C) in [0, 255]: grayscale or RGB as the model needs, bilinear resize to the image size."""
    from PIL import Image, UnidentifiedImageError

    h, w = manifest["input"]["normalization"]["image_size"]
    channels = manifest["input"]["shape"][-1]
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if im.size != (w, h):
                im = im.resize((w, h), Image.BILINEAR)
            x = np.asarray(im, dtype=np.float32)
    except (OSError, UnidentifiedImageError) as e:
        raise TfbitmetaError(f"cannot read image {path}: {e}") from None
    return x.reshape(h, w, channels)
