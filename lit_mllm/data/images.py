"""Image loading and the tower's preprocessing: the model's image layout (one resized image, or tiles) and
normalisation with the tower's mean/std."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from lit_mllm.data.layouts import ImageLayout, Resize
from lit_mllm.data.sample import ImageRef, Sample


def load_image(ref: ImageRef, sample: Sample, k: int = 0) -> Image.Image:
    """Open and decode an RGB image (a path or encoded bytes); a missing or undecodable image raises
    :class:`DataError` naming the sample, with reason ``missing_file`` / ``undecodable_image``."""
    try:
        with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise sample.fail(f"image file not found: {ref}", "missing_file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise sample.fail(f"could not decode {sample.image_name(k)}: {e}", "undecodable_image") from None


@dataclass(frozen=True)
class ImageTransform:
    """Cut an image into the layout's ``size x size`` crops, scale to [0, 1] and normalise: ``[k, 3, S, S]``."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layout: ImageLayout = field(default_factory=Resize)

    def num_crops(self, width: int, height: int) -> int:
        """Tower inputs an image of this size becomes (known before decoding: the file header gives the size)."""
        return self.layout.num_crops(width, height, self.size)

    def __call__(self, image: Image.Image) -> Tensor:
        crops = np.stack([np.asarray(c, dtype=np.float32) for c in self.layout.crops(image, self.size)])
        x = torch.from_numpy(crops / 255.0).permute(0, 3, 1, 2)  # [k, 3, S, S]
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std
