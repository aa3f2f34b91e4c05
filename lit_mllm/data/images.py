"""Image loading and the tower's preprocessing (resize to the tower's square input, normalise)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from lit_mllm.data.sample import Sample


def load_image(path: str, sample: Sample) -> Image.Image:
    """Open and decode an RGB image; a missing or undecodable file raises :class:`DataError` naming the sample."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise sample.fail(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise sample.fail(f"could not decode image {path}: {e}") from None


@dataclass(frozen=True)
class ImageTransform:
    """Resize to ``size x size`` (bicubic), scale to [0, 1], normalise with the tower's mean/std: ``[3, S, S]``."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, image: Image.Image) -> Tensor:
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # [3, S, S]
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std
