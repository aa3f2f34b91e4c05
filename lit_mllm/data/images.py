"""Image loading and the tower's preprocessing: the model's image layout (one resized image, or tiles) in the
loader, normalisation with the tower's mean/std in the model.

Decoding: a JPEG whose pixels are RGB or greyscale is decoded by torchvision's libjpeg-turbo decoder straight into
a uint8 tensor ``[3, H, W]`` (the same pixels as Pillow's decoder, tested, and about 20% faster: it skips Pillow's
conversion out of its own 4-byte pixels and the copy into an array), which the default ``"torch"`` resampler of the
layouts cuts and resizes without going through PIL. Other formats and modes (PNG, CMYK, palette, ...), any file
torchvision cannot decode, and every image when torchvision's decoder is not there, go through Pillow.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from lit_mllm.data.layouts import AnyImage, ImageLayout, Resize, to_tensor
from lit_mllm.data.sample import ImageRef, Sample

try:  # torchvision comes with open_clip; its image decoders are deprecated since 0.29 in favour of TorchCodec's
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # no torchvision, or a release without them: every image goes through Pillow
    decode_jpeg = None

_UNDECODABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError)


def load_image(ref: ImageRef, sample: Sample, k: int = 0) -> Image.Image:
    """Open and decode an RGB image (a path or encoded bytes); a missing or undecodable image raises
    :class:`DataError` naming the sample, with reason ``missing_file`` / ``undecodable_image``."""
    try:
        with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise sample.fail(f"image file not found: {ref}", "missing_file") from None
    except _UNDECODABLE as e:
        raise sample.fail(f"could not decode {sample.image_name(k)}: {e}", "undecodable_image") from None


def load_pixels(ref: ImageRef, sample: Sample, k: int = 0) -> Tensor:
    """The image as RGB uint8 ``[3, H, W]`` (a channels-last view): an RGB or greyscale JPEG decoded by
    torchvision, anything else by :func:`load_image` (which also raises for a missing or undecodable image)."""
    if isinstance(ref, bytes):
        data = ref
    else:
        try:
            with open(ref, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise sample.fail(f"image file not found: {ref}", "missing_file") from None
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            plain_jpeg = im.format == "JPEG" and im.mode in ("RGB", "L")
    except _UNDECODABLE:
        plain_jpeg = False
    if plain_jpeg and decode_jpeg is not None:
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # Pillow decides: it may read what libjpeg-turbo refused, or it raises the usual error
    return to_tensor(load_image(data, sample, k))


@dataclass(frozen=True)
class ImageTransform:
    """Cut an image into the layout's ``size x size`` crops: ``[k, 3, S, S]`` uint8.

    Normalisation (:func:`normalize`) happens in the model, on its device: uint8 batches are a quarter of the
    bytes to pass from loader workers and to copy to the accelerator."""

    size: int
    layout: ImageLayout = field(default_factory=Resize)

    def load(self, ref: ImageRef, sample: Sample, k: int = 0) -> AnyImage:
        """Image ``k`` of ``sample`` decoded in the form its layout resizes: a uint8 ``[3, H, W]`` tensor
        (:func:`load_pixels`) for the ``"torch"`` resampler, a PIL image (:func:`load_image`) for ``"pil"``."""
        if self.layout.resampler == "pil":
            return load_image(ref, sample, k)
        return load_pixels(ref, sample, k)

    def num_crops(self, width: int, height: int) -> int:
        """Tower inputs an image of this size becomes (known before decoding: the file header gives the size)."""
        return self.layout.num_crops(width, height, self.size)

    def __call__(self, image: AnyImage) -> Tensor:
        return self.layout.pixels(image, self.size)  # [k, 3, S, S]


def normalize(pixels: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 ``[..., 3, S, S]`` -> float32 scaled to [0, 1] and normalised with the tower's mean/std."""
    scale = 1.0 / (255.0 * torch.tensor(std, device=pixels.device))
    shift = -torch.tensor(mean, device=pixels.device) / torch.tensor(std, device=pixels.device)
    return pixels.float() * scale.view(3, 1, 1) + shift.view(3, 1, 1)
