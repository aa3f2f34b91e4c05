"""Image layouts: how one image becomes the vision tower's square inputs ("crops").

Fixed resolution gives one crop (:class:`Resize`, :class:`Letterbox` as LLaVA-1.5's "pad" mode,
:class:`ResizeCrop` as CLIP). Dynamic high resolution gives several: :class:`AnyRes` (LLaVA-NeXT),
:class:`Catty` (POINTS, Liu et al. 2024, arXiv:2409.04828) and :class:`MM1SubImages` (MM1, McKinley
et al. 2024, arXiv:2403.09611). ``num_crops`` needs only the image size (read from the file header), so the
number of image tokens of a sample is known before the image is decoded; ``crops`` returns exactly that many
RGB images of ``size x size``, in the order each class documents, and ``pixels`` the same crops as one uint8
tensor ``[k, 3, size, size]`` (what the loader ships).

Every layout resizes with the filter its method uses (bicubic, or bilinear for CATTY) through one of two
resamplers (``resampler``, an init argument of each layout):

- ``"torch"`` (default): the image as a uint8 tensor ``[3, H, W]``, resized by ``torch.nn.functional.interpolate``
  with ``antialias=True`` (the vectorised uint8 path torchvision's ``resize`` takes), cropped and padded by
  indexing. The crops are pixel-exact against transformers' default (torchvision) image processors
  (``CLIPImageProcessor``, ``LlavaImageProcessor``, ``LlavaNextImageProcessor``; tested). About 4x faster than
  Pillow (640 x 480 to 336 x 336: 0.7 ms against 3.0 ms on one core). Against Pillow: the same filter and pixel
  grid, but 16-bit fixed-point weights where Pillow has 22-bit ones, so about 1-5% of the values of a photo
  differ by one level and about ten in a million by two or three (at sharp edges, where Pillow 13 also clips
  differently when it runs the vertical pass first); ``tests/test_layouts.py`` measures it.
- ``"pil"``: ``PIL.Image.resize`` on PIL images, pixel-exact against transformers' PIL image processors
  (``backend="pil"``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from fractions import Fraction
from math import ceil
from typing import Literal, NamedTuple, TypeAlias

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

BICUBIC, BILINEAR = Image.Resampling.BICUBIC, Image.Resampling.BILINEAR
Resampler = Literal["torch", "pil"]
"""Which library resizes: see the module docstring."""
RESAMPLERS = ("torch", "pil")
AnyImage: TypeAlias = Image.Image | Tensor
"""An RGB image as a PIL image, or as a uint8 tensor ``[3, H, W]`` (any strides)."""
_TORCH_MODES = {BICUBIC: "bicubic", BILINEAR: "bilinear"}
CLIP_MEAN_RGB = (122, 116, 104)  # OpenAI CLIP's mean as 0-255, truncated as LLaVA-1.5 does


def _check_dims(width: int, height: int, size: int) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height} (width x height)")
    if size < 1:
        raise ValueError(f"crop size must be a positive number of pixels, got {size}")


def _check_fill(fill: Sequence[int]) -> tuple[int, int, int]:
    if len(fill) != 3 or not all(0 <= int(c) <= 255 for c in fill):
        raise ValueError(f"fill must be three 0-255 RGB values, got {tuple(fill)}")
    return tuple(int(c) for c in fill)


# -- image operations on either form: Pillow for a PIL image, torch for a tensor --------------------------------
def image_size(image: AnyImage) -> tuple[int, int]:
    """``(width, height)`` of a PIL image or a ``[3, H, W]`` tensor."""
    return image.size if isinstance(image, Image.Image) else (image.shape[-1], image.shape[-2])


def to_tensor(image: Image.Image) -> Tensor:
    """A PIL image as RGB uint8 ``[3, H, W]`` (a channels-last view of the ``[H, W, 3]`` pixels)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)


def to_pil(pixels: Tensor) -> Image.Image:
    """A uint8 ``[3, H, W]`` tensor as an RGB PIL image."""
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())


def resize(image: AnyImage, width: int, height: int, resample=BICUBIC) -> AnyImage:
    """``image`` resized to ``width x height`` with ``resample`` (bicubic or bilinear, antialiased when shrinking)
    by Pillow for a PIL image, by torch for a tensor; the image itself when it already has that size."""
    if image_size(image) == (width, height):
        return image
    if isinstance(image, Image.Image):
        return image.resize((width, height), resample)
    out = F.interpolate(image[None], size=(height, width), mode=_TORCH_MODES[resample], antialias=True)
    return out[0]  # [3, height, width]


def _place(image: AnyImage, width: int, height: int, x: int, y: int, fill: tuple[int, int, int]) -> AnyImage:
    """A ``width x height`` canvas of colour ``fill`` with ``image`` pasted at top-left ``(x, y)``."""
    w, h = image_size(image)
    if isinstance(image, Image.Image):
        canvas = Image.new("RGB", (width, height), fill)
        canvas.paste(image, (x, y))
        return canvas
    canvas = torch.tensor(fill, dtype=torch.uint8).expand(height, width, 3).contiguous().permute(2, 0, 1)
    canvas[:, y : y + h, x : x + w] = image  # channels-last like a decoded image: torch's fast resize path
    return canvas


def _same_storage(crop: Tensor, image: AnyImage) -> bool:
    """Whether ``crop`` is (a view of) the ``image`` tensor itself, which the caller may still change."""
    return (
        isinstance(image, Tensor) and crop.untyped_storage().data_ptr() == image.untyped_storage().data_ptr()
    )


def _tiles(image: AnyImage, xs: Sequence[int], ys: Sequence[int], size: int) -> list[AnyImage]:
    """``size x size`` windows with top-left corners ``xs x ys``, row-major (left to right, top to bottom)."""
    if isinstance(image, Image.Image):
        return [image.crop((x, y, x + size, y + size)) for y in ys for x in xs]
    return [image[:, y : y + size, x : x + size] for y in ys for x in xs]


class ImageLayout(ABC):
    """How an image becomes ``num_crops`` tower inputs of ``size x size``; subclasses implement both."""

    def __init__(self, resampler: Resampler = "torch") -> None:
        """
        Args:
            resampler: ``"torch"`` (fast; pixel-exact against transformers' default torchvision image
                processors) or ``"pil"`` (pixel-exact against their ``backend="pil"`` processors); see
                :mod:`lit_mllm.data.layouts`.
        """
        if resampler not in RESAMPLERS:
            raise ValueError(f"resampler must be one of {RESAMPLERS}, got {resampler!r}")
        self.resampler = resampler

    @abstractmethod
    def num_crops(self, width: int, height: int, size: int) -> int:
        """Number of crops (tiles and any overview) of a ``width x height`` image for a tower of ``size``."""

    def crops(self, image: AnyImage, size: int) -> list[Image.Image]:
        """The ``num_crops(*image_size(image), size)`` RGB crops, each exactly ``size x size``."""
        return [c if isinstance(c, Image.Image) else to_pil(c) for c in self._cut(image, size)]

    def pixels(self, image: AnyImage, size: int) -> Tensor:
        """The same crops as uint8 ``[num_crops, 3, size, size]`` (contiguous)."""
        crops = [to_tensor(c) if isinstance(c, Image.Image) else c for c in self._cut(image, size)]
        if len(crops) == 1 and crops[0].is_contiguous() and not _same_storage(crops[0], image):
            return crops[0][None]  # one crop that a resize made: returned without a copy
        return torch.stack(crops)

    def _cut(self, image: AnyImage, size: int) -> list[AnyImage]:
        if isinstance(image, Tensor) and (
            image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3
        ):
            raise ValueError(
                f"an image tensor must be uint8 [3, H, W], got {image.dtype} {list(image.shape)}; convert "
                "a float image with (x * 255).round().to(torch.uint8)"
            )
        _check_dims(*image_size(image), size)
        if self.resampler == "torch":
            image = to_tensor(image) if isinstance(image, Image.Image) else image
        else:
            image = to_pil(image) if isinstance(image, Tensor) else image
            image = image if image.mode == "RGB" else image.convert("RGB")
        return self._crops(image, size)

    @abstractmethod
    def _crops(self, image: AnyImage, size: int) -> list[AnyImage]:
        """The crops of an RGB image: a PIL image (``resampler="pil"``) or a uint8 ``[3, H, W]`` tensor."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class _OneCrop(ImageLayout):
    def num_crops(self, width: int, height: int, size: int) -> int:
        _check_dims(width, height, size)
        return 1


class Resize(_OneCrop):
    """Bicubic resize to ``size x size``, ignoring the aspect ratio (LLaVA-1.5's default); one crop."""

    def _crops(self, image, size):
        return [resize(image, size, size)]


class Letterbox(_OneCrop):
    """Pad to a square of side ``max(width, height)`` with ``fill``, content centred (offset
    ``(side - w) // 2``, ``(side - h) // 2``), then bicubic resize to ``size x size``: LLaVA-1.5's "pad"
    mode; one crop."""

    def __init__(self, fill: tuple[int, int, int] = CLIP_MEAN_RGB, resampler: Resampler = "torch") -> None:
        """
        Args:
            fill: RGB colour (0-255) of the padding. The default is OpenAI CLIP's mean, which LLaVA-1.5 pads
                with, so padding normalises to ~0; use the tower's own mean (e.g. (127, 127, 127) for SigLIP).
            resampler: ``"torch"`` or ``"pil"`` (see :class:`ImageLayout`).
        """
        super().__init__(resampler)
        self.fill = _check_fill(fill)

    def _crops(self, image, size):
        (w, h), side = image_size(image), max(image_size(image))
        return [resize(_place(image, side, side, (side - w) // 2, (side - h) // 2, self.fill), size, size)]


class ResizeCrop(_OneCrop):
    """Bicubic resize of the shorter side to ``size`` (longer side ``size * long // short``), then a centre
    crop at offset ``(new - size) // 2`` (CLIP's preprocessing, as transformers' ``CLIPImageProcessor``);
    one crop."""

    def _crops(self, image, size):
        w, h = image_size(image)
        nw, nh = (size, size * h // w) if w <= h else (size * w // h, size)
        return _tiles(resize(image, nw, nh), [(nw - size) // 2], [(nh - size) // 2], size)


class AnyRes(ImageLayout):
    """LLaVA-NeXT's AnyRes: pick the grid of tiles whose resolution fits the image best (largest effective
    resolution, then least waste, first listed on ties, as LLaVA-NeXT's ``select_best_resolution``); resize
    the image into it keeping the aspect ratio (bicubic, scaled side rounded up), pad centred with ``fill``.

    Order: the whole image squashed to ``size x size`` first (LLaVA-NeXT's base image), then the tiles
    row-major; ``1 + rows * cols`` crops.
    """

    def __init__(
        self,
        grids: Sequence[tuple[int, int]] = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3)),
        fill: tuple[int, int, int] = (0, 0, 0),
        resampler: Resampler = "torch",
    ) -> None:
        """
        Args:
            grids: Candidate grids as (rows, cols) of tiles. The default is LLaVA-NeXT's
                ``image_grid_pinpoints`` ([[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]] as
                height, width) in units of the tower's input size.
            fill: RGB colour (0-255) of the padding; LLaVA-NeXT pads with black.
            resampler: ``"torch"`` or ``"pil"`` (see :class:`ImageLayout`).
        """
        super().__init__(resampler)
        grids = [tuple(int(n) for n in g) for g in grids]
        if not grids or any(len(g) != 2 or min(g) < 1 for g in grids):
            raise ValueError(f"grids must be a non-empty list of (rows, cols) with both >= 1, got {grids}")
        self.grids, self.fill = grids, _check_fill(fill)

    def grid(self, width: int, height: int, size: int) -> tuple[int, int]:
        """The (rows, cols) chosen for a ``width x height`` image and tiles of ``size``."""
        _check_dims(width, height, size)
        best, best_key = None, None
        for rows, cols in self.grids:
            scale = min(cols * size / width, rows * size / height)
            effective = min(int(width * scale) * int(height * scale), width * height)
            key = (effective, effective - rows * cols * size * size)  # more effective, then less waste
            if best_key is None or key > best_key:
                best, best_key = (rows, cols), key
        return best

    def num_crops(self, width: int, height: int, size: int) -> int:
        rows, cols = self.grid(width, height, size)
        return 1 + rows * cols

    def _crops(self, image, size):
        (w, h) = image_size(image)
        rows, cols = self.grid(w, h, size)
        tw, th = cols * size, rows * size
        scale_w, scale_h = tw / w, th / h
        nw, nh = (tw, min(ceil(h * scale_w), th)) if scale_w < scale_h else (min(ceil(w * scale_h), tw), th)
        canvas = _place(resize(image, nw, nh), tw, th, (tw - nw) // 2, (th - nh) // 2, self.fill)
        steps_x, steps_y = range(0, tw, size), range(0, th, size)
        return [resize(image, size, size), *_tiles(canvas, steps_x, steps_y, size)]


class Tiling(NamedTuple):
    """Where :class:`Catty` cuts: the image is resized to ``width x height`` and windows of the tower's size
    start at ``xs`` (columns) x ``ys`` (rows)."""

    rows: int
    cols: int
    width: int
    height: int
    xs: list[int]
    ys: list[int]


class Catty(ImageLayout):
    """POINTS' CATTY (Consistent Aspect Ratio Dynamic High Resolution): tiles that keep the aspect ratio.

    Among grids of ``cols x rows <= max_tiles`` tiles whose ratio ``cols / rows`` lies on the image's side of
    1 (>= the image's ``w / h`` for a wide image, <= for a tall one, any for a square), take the ratio
    nearest ``w / h``, and among grids of that ratio the one whose tile count is nearest
    ``w * h / size**2`` (the fewer tiles on ties). Resize (bilinear, as POINTS) keeping the aspect ratio so
    that the grid's width (tall image) or height (otherwise) is filled exactly; the other side is then at
    most the grid's, so ``rows x cols`` windows of ``size`` slide over it with overlap and without padding
    or distortion. Order: tiles row-major, then the thumbnail.

    POINTS has no overlap setting: the overlap is what fitting an integer grid to the aspect ratio leaves,
    ``size - (L - size) / (n - 1)`` along a side of length ``L`` cut into ``n`` windows (see :meth:`plan`).
    Differences from the POINTS code: window ``i`` starts at ``floor(i * (L - size) / (n - 1))``, so the last
    one ends at the edge (POINTS' integer stride can leave a few pixels out, or add or drop a window); an
    aspect ratio beyond ``max_tiles : 1`` is first squashed to it (POINTS' ``do_resize``) instead of refused;
    the resized size is computed in integers (POINTS' floats are 1 px short in rare cases); the thumbnail
    squashes the original image, not the resized one.
    """

    def __init__(self, max_tiles: int = 8, thumbnail: bool = True, resampler: Resampler = "torch") -> None:
        """
        Args:
            max_tiles: Most tiles an image is cut into (POINTS uses 8); the thumbnail is not counted.
            thumbnail: Append the whole image squashed to the tower's size after the tiles.
            resampler: ``"torch"`` or ``"pil"`` (see :class:`ImageLayout`).
        """
        super().__init__(resampler)
        if max_tiles < 1:
            raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")
        self.max_tiles, self.thumbnail = int(max_tiles), bool(thumbnail)

    def plan(self, width: int, height: int, size: int) -> Tiling:
        """The grid, the resized image size and the window offsets for a ``width x height`` image."""
        _check_dims(width, height, size)
        n = self.max_tiles
        w, h = min(width, n * height), min(height, n * width)  # the aspect ratio squashed into [1/n, n]
        aspect = Fraction(w, h)
        grids = [(c, k // c) for k in range(1, n + 1) for c in range(1, k + 1) if k % c == 0]  # (cols, rows)
        if aspect > 1:  # wide: grids at least as wide, so the height is filled and the width overlaps
            grids = [g for g in grids if Fraction(*g) >= aspect]
        elif aspect < 1:
            grids = [g for g in grids if Fraction(*g) <= aspect]
        ratio = min({Fraction(*g) for g in grids}, key=lambda r: abs(r - aspect))
        same_ratio = [g for g in grids if Fraction(*g) == ratio]  # by increasing count: fewer tiles win ties
        cols, rows = min(same_ratio, key=lambda g: abs(g[0] * g[1] * size**2 - w * h))
        if w < h:
            rw = cols * size
            rh = h * rw // w
        else:
            rh = rows * size
            rw = w * rh // h

        def starts(length: int, count: int) -> list[int]:
            return [0] if count == 1 else [i * (length - size) // (count - 1) for i in range(count)]

        return Tiling(rows, cols, rw, rh, starts(rw, cols), starts(rh, rows))

    def num_crops(self, width: int, height: int, size: int) -> int:
        plan = self.plan(width, height, size)
        return plan.rows * plan.cols + self.thumbnail

    def _crops(self, image, size):
        plan = self.plan(*image_size(image), size)
        tiles = _tiles(resize(image, plan.width, plan.height, BILINEAR), plan.xs, plan.ys, size)
        return tiles + ([resize(image, size, size, BILINEAR)] if self.thumbnail else [])


class MM1SubImages(ImageLayout):
    """MM1's sub-image decomposition: the image squashed to ``size x size`` as an overview, then the image
    squashed to a ``grid * size`` square and cut into ``grid x grid`` sub-images, row-major (MM1: a 672 px
    overview plus 4 sub-images of a 1344 px version). Bicubic; ``1 + grid**2`` crops, overview first.
    """

    def __init__(self, grid: int = 2, resampler: Resampler = "torch") -> None:
        """
        Args:
            grid: Sub-images per side of the high-resolution version (MM1 uses 2).
            resampler: ``"torch"`` or ``"pil"`` (see :class:`ImageLayout`).
        """
        super().__init__(resampler)
        if grid < 1:
            raise ValueError(f"grid must be >= 1 sub-image per side, got {grid}")
        self.grid = int(grid)

    def num_crops(self, width: int, height: int, size: int) -> int:
        _check_dims(width, height, size)
        return 1 + self.grid**2

    def _crops(self, image, size):
        steps = range(0, self.grid * size, size)
        big = resize(image, self.grid * size, self.grid * size)
        return [resize(image, size, size), *_tiles(big, steps, steps, size)]
