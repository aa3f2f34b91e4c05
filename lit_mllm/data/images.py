"""Image loading and the tower's preprocessing: the model's image layout (one resized image, or tiles) in the
loader, normalisation with the tower's mean/std in the model."""

from __future__ import annotations

import io
from collections.abc import Sequence
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
    """Cut an image into the layout's ``size x size`` crops: ``[k, 3, S, S]`` uint8.

    Normalisation (:func:`normalize`) happens in the model, on its device: uint8 batches are a quarter of the
    bytes to pass from loader workers and to copy to the accelerator."""

    size: int
    layout: ImageLayout = field(default_factory=Resize)

    def num_crops(self, width: int, height: int) -> int:
        """Tower inputs an image of this size becomes (known before decoding: the file header gives the size)."""
        return self.layout.num_crops(width, height, self.size)

    def __call__(self, image: Image.Image) -> Tensor:
        crops = np.stack([np.asarray(c, dtype=np.uint8) for c in self.layout.crops(image, self.size)])
        return torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous()  # [k, 3, S, S]


def normalize(pixels: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 ``[..., 3, S, S]`` -> float32 scaled to [0, 1] and normalised with the tower's mean/std."""
    scale = 1.0 / (255.0 * torch.tensor(std, device=pixels.device))
    shift = -torch.tensor(mean, device=pixels.device) / torch.tensor(std, device=pixels.device)
    return pixels.float() * scale.view(3, 1, 1) + shift.view(3, 1, 1)
