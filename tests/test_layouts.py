"""Image layouts: crop counts known from the size alone, exact crop geometry, parity with transformers'
LLaVA-NeXT and CLIP image processors (the torchvision ones for the default ``resampler="torch"``, the PIL ones for
``resampler="pil"``), how far the two resamplers are apart, and CATTY's tiling properties (POINTS)."""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw
from torchvision.transforms.v2 import functional as tvF

from lit_mllm.data.layouts import (
    AnyRes,
    Catty,
    ImageLayout,
    Letterbox,
    MM1SubImages,
    Resize,
    ResizeCrop,
)

LAYOUTS = [
    Resize(),
    Letterbox(),
    ResizeCrop(),
    AnyRes(),
    AnyRes(grids=[(1, 1), (3, 2), (1, 4)], fill=(255, 0, 0)),
    Catty(),
    Catty(max_tiles=3, thumbnail=False),
    MM1SubImages(),
    MM1SubImages(grid=3),
]
dims = st.integers(1, 80)


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def quadrants(width: int, height: int) -> Image.Image:
    """Red top-left, green top-right, blue bottom-left, white bottom-right."""
    a = np.zeros((height, width, 3), np.uint8)
    a[: height // 2, : width // 2], a[: height // 2, width // 2 :] = RED, GREEN
    a[height // 2 :, : width // 2], a[height // 2 :, width // 2 :] = BLUE, WHITE
    return Image.fromarray(a)


def px(image: Image.Image, x: int, y: int) -> np.ndarray:
    return np.asarray(image, dtype=int)[y, x]


def resized(
    image: Image.Image, width: int, height: int, resampler: str, resample=Image.BICUBIC
) -> np.ndarray:
    """The reference resize of each resampler: Pillow's, or torchvision's antialiased resize of the uint8 tensor
    (what transformers' torchvision image processors call)."""
    if resampler == "pil":
        return np.asarray(image.resize((width, height), resample))
    mode = {Image.BICUBIC: tvF.InterpolationMode.BICUBIC, Image.BILINEAR: tvF.InterpolationMode.BILINEAR}[
        resample
    ]
    chw = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    return tvF.resize(chw, [height, width], interpolation=mode, antialias=True).permute(1, 2, 0).numpy()


RESAMPLERS = ["torch", "pil"]


@pytest.mark.parametrize("layout", LAYOUTS, ids=repr)
@settings(max_examples=25, deadline=None)
@given(w=dims, h=dims, size=st.integers(1, 12), mode=st.sampled_from(["RGB", "L", "RGBA", "P"]))
def test_num_crops_matches_crops_and_every_crop_is_square_rgb(layout, w, h, size, mode):
    crops = layout.crops(Image.new(mode, (w, h)), size)
    assert len(crops) == layout.num_crops(w, h, size)
    assert all(c.size == (size, size) and c.mode == "RGB" for c in crops)


@settings(max_examples=30, deadline=None)
@given(w=dims, h=dims)
def test_letterbox_pastes_the_image_centred_on_the_fill(w, h):
    side = max(w, h)  # crop size = longer side: no resize, so the placement is exact
    out = np.asarray(Letterbox(fill=(1, 2, 3)).crops(noise(w, h), side)[0])
    x0, y0 = (side - w) // 2, (side - h) // 2
    np.testing.assert_array_equal(out[y0 : y0 + h, x0 : x0 + w], np.asarray(noise(w, h)))
    mask = np.ones((side, side), bool)
    mask[y0 : y0 + h, x0 : x0 + w] = False
    assert (out[mask] == (1, 2, 3)).all()


@pytest.mark.parametrize("transpose", [False, True])
def test_letterbox_keeps_aspect_and_a_coloured_block_lands_where_the_formula_says(transpose):
    # 60x30 white with a red 10x10 block at x 40..50, y 10..20 -> square 60 (offset y 15) -> x0.5 to 30 px
    a = np.full((30, 60, 3), 255, np.uint8)
    a[10:20, 40:50] = (255, 0, 0)
    image, fill = Image.fromarray(a), (122, 116, 104)
    x, y = 22, 15  # the block's centre
    if transpose:
        image, x, y = image.transpose(Image.Transpose.TRANSPOSE), y, x
    out = Letterbox().crops(image, 30)[0]
    assert out.size == (30, 30)
    np.testing.assert_allclose(px(out, x, y), (255, 0, 0), atol=6)
    arr = np.asarray(out, dtype=int)
    if transpose:
        arr = arr.transpose(1, 0, 2)
    # content spans rows 7.5..22.5 and every column: the 2:1 aspect ratio is kept
    assert (arr[:6] == fill).all() and (arr[25:] == fill).all()
    assert (arr[9:21] != fill).any(-1).all()


@pytest.mark.parametrize("resampler", RESAMPLERS)
def test_resize_crop_equals_hand_computed_crops(resampler):
    layout = ResizeCrop(resampler=resampler)
    image = noise(31, 10)  # shorter side is already 10: no resize, crop at left (31 - 10) // 2 = 10
    np.testing.assert_array_equal(layout.crops(image, 10)[0], np.asarray(image)[:, 10:20])
    image = noise(20, 41)  # resize to 10x20 (20 * 41 // ... = 10 * 41 // 20), crop at top (20 - 10) // 2 = 5
    expected = resized(image, 10, 20, resampler)[5:15]
    np.testing.assert_array_equal(layout.crops(image, 10)[0], expected)
    bands = np.zeros((8, 24, 3), np.uint8)
    bands[:, 8:16] = 200  # a grey middle third between black thirds, at the crop size: only grey survives
    assert (np.asarray(ResizeCrop().crops(Image.fromarray(bands), 8)[0]) == 200).all()


@pytest.mark.parametrize("resampler", RESAMPLERS)
@settings(max_examples=30, deadline=None)
@given(w=dims, h=dims, size=st.integers(2, 16))
def test_resize_crop_matches_transformers_clip_processor(resampler, w, h, size):
    from transformers.models.clip.image_processing_clip import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = (CLIPImageProcessorPil if resampler == "pil" else CLIPImageProcessor)(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_rescale=False,
        do_normalize=False,
    )
    image = noise(w, h)
    expected = proc(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_array_equal(ResizeCrop(resampler=resampler).crops(image, size)[0], expected)


@pytest.mark.parametrize("resampler", RESAMPLERS)
def test_resize_is_a_plain_bicubic_resize(resampler):
    for w, h in ((37, 20), (9, 5), (640, 480)):  # shrink, enlarge, a photo to a tower's 336
        image, size = noise(w, h), 336 if w == 640 else 16
        expected = resized(image, size, size, resampler)
        np.testing.assert_array_equal(Resize(resampler=resampler).crops(image, size)[0], expected)


@pytest.mark.parametrize("resampler", RESAMPLERS)
@settings(max_examples=20, deadline=None)
@given(w=dims, h=dims, size=st.integers(2, 16))
def test_letterbox_matches_transformers_llava_processor(resampler, w, h, size):
    from transformers.models.llava.image_processing_llava import LlavaImageProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    proc = (LlavaImageProcessorPil if resampler == "pil" else LlavaImageProcessor)(
        size={"height": size, "width": size}, do_center_crop=False, do_pad=True, do_rescale=False,
        do_normalize=False,
    )  # fmt: skip
    fill = tuple(int(x * 255) for x in proc.image_mean)  # what LLaVA pads with
    expected = proc(noise(w, h), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_array_equal(Letterbox(fill, resampler=resampler).crops(noise(w, h), size)[0], expected)


grid_lists = st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None)
@given(w=st.integers(1, 4000), h=st.integers(1, 4000), size=st.sampled_from([14, 336, 384]), grids=grid_lists)
def test_anyres_grid_is_transformers_select_best_resolution(w, h, size, grids):
    from transformers.image_processing_utils import select_best_resolution

    for candidates in (grids, AnyRes().grids):
        best_h, best_w = select_best_resolution((h, w), [(r * size, c * size) for r, c in candidates])
        assert AnyRes(grids=candidates).grid(w, h, size) == (best_h // size, best_w // size)


@pytest.mark.parametrize("resampler", RESAMPLERS)
@settings(max_examples=30, deadline=None)
@given(w=dims, h=dims, size=st.integers(2, 16))
def test_anyres_crops_match_transformers_llava_next_processor(resampler, w, h, size):
    from transformers.models.llava_next.image_processing_llava_next import LlavaNextImageProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    layout = AnyRes(resampler=resampler)
    proc = (LlavaNextImageProcessorPil if resampler == "pil" else LlavaNextImageProcessor)(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_grid_pinpoints=[[r * size, c * size] for r, c in layout.grids],
        do_rescale=False,
        do_normalize=False,
    )
    image = noise(w, h)
    expected = proc(image, return_tensors="np")["pixel_values"][0].transpose(0, 2, 3, 1)  # [N, S, S, 3]
    np.testing.assert_array_equal(np.stack([np.asarray(c) for c in layout.crops(image, size)]), expected)


def test_anyres_order_is_base_image_then_tiles_row_major():
    crops = AnyRes(grids=[(2, 2)]).crops(quadrants(40, 40), 20)  # exactly 2x2 tiles, no padding
    np.testing.assert_array_equal(crops[0], resized(quadrants(40, 40), 20, 20, "torch"))
    assert [tuple(px(c, 10, 10)) for c in crops[1:]] == [RED, GREEN, BLUE, WHITE]


@pytest.mark.parametrize(
    "w, h, rows, cols, resized, xs, ys",
    [
        (672, 336, 1, 2, (672, 336), [0, 336], [0]),  # 2:1 exists: no overlap
        (1000, 600, 2, 4, (1120, 672), [0, 261, 522, 784], [0, 336]),  # ratio 2 >= 5/3; 8 tiles nearer 5.3
        (336, 336, 1, 1, (336, 336), [0], [0]),
        (50, 900, 8, 1, (336, 2688), [0], [i * 336 for i in range(8)]),  # 1:18 squashed to 1:8
        (100, 99, 2, 3, (678, 672), [0, 171, 342], [0, 336]),  # barely wide -> 3:2, tiles overlap by half
    ],
)
def test_catty_hand_computed_plans(w, h, rows, cols, resized, xs, ys):
    plan = Catty(max_tiles=8).plan(w, h, 336)
    assert (plan.rows, plan.cols, (plan.width, plan.height)) == (rows, cols, resized)
    assert (plan.xs, plan.ys) == (xs, ys)
    assert Catty().num_crops(w, h, 336) == rows * cols + 1


@settings(max_examples=300, deadline=None)
@given(w=st.integers(1, 5000), h=st.integers(1, 5000), size=st.sampled_from([14, 336]), n=st.integers(1, 12))
def test_catty_tiles_cover_the_image_with_the_stride_formula_overlap(w, h, size, n):
    plan = Catty(max_tiles=n).plan(w, h, size)
    assert plan.rows * plan.cols <= n
    aspect, ratio = Fraction(min(w, n * h), min(h, n * w)), Fraction(plan.cols, plan.rows)
    assert ratio >= aspect if aspect > 1 else ratio <= aspect if aspect < 1 else ratio == 1
    others = [Fraction(c, r) for r in range(1, n + 1) for c in range(1, n // r + 1)]
    others = [o for o in others if (o >= aspect if aspect > 1 else o <= aspect if aspect < 1 else True)]
    assert abs(ratio - aspect) == min(abs(o - aspect) for o in others)  # nearest ratio on the image's side
    unit = ratio.numerator * ratio.denominator  # grids of that ratio are k times (numerator x denominator)
    counts = [k * k * unit for k in range(1, n + 1) if k * k * unit <= n]
    area = Fraction(min(w, n * h) * min(h, n * w), size**2)  # the (squashed) image's size in tiles
    assert abs(plan.rows * plan.cols - area) == min(abs(c - area) for c in counts)  # then the nearest count
    assert abs(Fraction(plan.width, plan.height) - aspect) <= aspect / size  # aspect kept up to rounding
    for length, starts, count in ((plan.width, plan.xs, plan.cols), (plan.height, plan.ys, plan.rows)):
        assert size <= length <= count * size and len(starts) == count
        assert starts[0] == 0 and starts[-1] + size == length  # first and last windows touch the edges
        steps = np.diff(starts)
        if count > 1:  # overlap = size - stride, stride = (length - size) / (count - 1), to a pixel
            assert (np.abs(steps - (length - size) / (count - 1)) < 1).all()
        assert (steps >= 0).all() and (steps <= size).all()  # no gaps (a window may repeat when L ~ size)


def test_catty_order_is_tiles_row_major_then_thumbnail():
    image = quadrants(90, 60)  # 3:2 -> 3x2 tiles of 30 px
    crops = Catty().crops(image, 30)
    assert len(crops) == 7
    assert [tuple(px(c, 0, 0)) for c in (crops[0], crops[2])] == [RED, GREEN]
    assert tuple(px(crops[3], 0, 29)) == BLUE and tuple(px(crops[5], 29, 29)) == WHITE
    np.testing.assert_array_equal(crops[-1], resized(image, 30, 30, "torch", Image.BILINEAR))


@pytest.mark.parametrize("resampler", RESAMPLERS)
def test_mm1_overview_then_sub_images_of_the_high_resolution_version(resampler):
    image = quadrants(50, 30)
    crops = MM1SubImages(grid=2, resampler=resampler).crops(image, 16)
    np.testing.assert_array_equal(crops[0], resized(image, 16, 16, resampler))
    big = resized(image, 32, 32, resampler)
    for i, crop in enumerate(crops[1:]):
        r, c = divmod(i, 2)
        np.testing.assert_array_equal(crop, big[r * 16 : r * 16 + 16, c * 16 : c * 16 + 16])


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: AnyRes(grids=[]), "non-empty"),
        (lambda: AnyRes(grids=[(0, 2)]), r"\(rows, cols\)"),
        (lambda: Letterbox(fill=(300, 0, 0)), "0-255"),
        (lambda: Letterbox(fill=(1, 2)), "three"),
        (lambda: Catty(max_tiles=0), "max_tiles must be >= 1"),
        (lambda: MM1SubImages(grid=0), "grid must be >= 1"),
        (lambda: Resize(resampler="cv2"), r"resampler must be one of \('torch', 'pil'\)"),
        (lambda: Catty(resampler="PIL"), "resampler must be one of"),
        (lambda: Resize().num_crops(0, 5, 14), "image size must be positive"),
        (lambda: AnyRes().num_crops(5, 5, 0), "crop size must be a positive"),
        (lambda: Catty().crops(Image.new("RGB", (4, 4)), -1), "crop size must be a positive"),
    ],
)
def test_invalid_arguments_raise_clearly(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("layout", LAYOUTS, ids=repr)
def test_layouts_are_chosen_by_class_path(layout):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--layout", type=ImageLayout)
    init_args = {k: v for k, v in vars(layout).items()}
    cfg = parser.parse_object({"layout": {"class_path": type(layout).__name__, "init_args": init_args}})
    built = parser.instantiate_classes(cfg).layout
    assert type(built) is type(layout) and vars(built) == vars(layout)


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like JPEG: smooth colour fields, sharp-edged discs and a line of text, encoded and decoded."""
    rng = np.random.default_rng(seed)
    field = rng.integers(0, 256, (max(height // 8, 1), max(width // 8, 1), 3), dtype=np.uint8)
    image = Image.fromarray(field).resize((width, height), Image.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y, r = (int(v) for v in rng.integers(0, (width, height, 60)))
        draw.ellipse((x, y, x + r + 4, y + r + 4), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw.text((2, 2), "Text 42", fill=(255, 255, 255))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return Image.open(buf).convert("RGB")


@pytest.mark.parametrize(
    "make", [Resize, Letterbox, ResizeCrop, AnyRes, Catty, MM1SubImages], ids=lambda m: m.__name__
)
def test_torch_and_pil_resamplers_agree_within_a_level_on_photos(make):
    """The fast resampler against Pillow on photo-like images: the same geometry, and values within one level of
    255 but for about ten in a million (measured: 2 of 227,361 here, at most 1.2e-5 of the values over 40 photos of
    40-900 px to 32-336 px). torch's 16-bit weights round differently from Pillow's 22-bit ones, a difference of one
    in the first pass can become two or three after the second at a sharp edge, and Pillow 13 runs the vertical
    pass first when an image shrinks much more in height, which changes what is clipped there."""
    diffs = []
    for seed, (w, h, size) in enumerate(
        [(640, 480, 96), (90, 300, 32), (301, 97, 48), (50, 40, 64), (37, 37, 37)]
    ):
        image = photo(w, h, seed)
        fast, exact = make(resampler="torch").crops(image, size), make(resampler="pil").crops(image, size)
        assert len(fast) == len(exact) == make().num_crops(w, h, size)
        diffs.append(np.abs(np.stack(fast).astype(int) - np.stack(exact)).ravel())
    diff = np.concatenate(diffs)
    assert (diff > 1).mean() <= 1e-4
    assert diff.max() < 8  # a crop one pixel off, or another filter, differs by tens of levels at these edges
    assert 0 < (diff > 0).mean() < 0.1  # they do differ: the test sees two resamplers


@pytest.mark.parametrize("layout", LAYOUTS + [AnyRes(resampler="pil"), Catty(resampler="pil")], ids=repr)
def test_pixels_are_the_crops_from_a_pil_image_or_a_tensor(layout):
    image = photo(70, 45, seed=1)
    expected = np.stack([np.asarray(c) for c in layout.crops(image, 24)])  # [k, S, S, 3]
    chw = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a channels-last view, as decoded
    for given_image in (image, chw, chw.contiguous()):
        pixels = layout.pixels(given_image, 24)
        assert pixels.dtype == torch.uint8 and pixels.shape == (layout.num_crops(70, 45, 24), 3, 24, 24)
        np.testing.assert_array_equal(pixels.permute(0, 2, 3, 1).numpy(), expected)
    np.testing.assert_array_equal(np.stack([np.asarray(c) for c in layout.crops(chw, 24)]), expected)


@pytest.mark.parametrize(
    "bad", [torch.zeros(3, 8, 8), torch.zeros(8, 8, 3, dtype=torch.uint8)], ids=["float", "hwc"]
)
def test_an_image_tensor_must_be_uint8_chw(bad):
    with pytest.raises(ValueError, match=r"uint8 \[3, H, W\]"):
        Resize().pixels(bad, 4)
