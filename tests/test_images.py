"""Image decoding for the loader: torchvision's JPEG decoder gives Pillow's pixels, everything else goes through
Pillow, bad files fail as before; and the image transform ships the layout's crops as one uint8 tensor."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lit_mllm.data.images import ImageTransform, load_image, load_pixels
from lit_mllm.data.layouts import AnyRes, Letterbox, Resize
from lit_mllm.data.sample import DataError, Sample


def encoded(mode: str, fmt: str = "JPEG", size=(61, 47), **save) -> bytes:
    rng = np.random.default_rng(0)
    field = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BILINEAR)
    buf = io.BytesIO()
    field.convert(mode).save(buf, fmt, **save)
    return buf.getvalue()


SAMPLE = Sample("s", [], ["x.jpg"], "test")
CASES = {
    "jpeg 4:2:0": encoded("RGB"),
    "jpeg 4:4:4": encoded("RGB", subsampling=0),
    "jpeg progressive": encoded("RGB", progressive=True, size=(200, 150)),
    "jpeg grey": encoded("L"),
    "jpeg cmyk (Pillow)": encoded("CMYK"),
    "png (Pillow)": encoded("RGB", "PNG"),
    "png palette (Pillow)": encoded("P", "PNG"),
}


@pytest.mark.parametrize("data", CASES.values(), ids=CASES.keys())
def test_load_pixels_gives_pillows_rgb_pixels(tmp_path, data):
    path = tmp_path / "image"
    path.write_bytes(data)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    for ref in (str(path), data):
        pixels = load_pixels(ref, SAMPLE)
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, *expected.shape[:2])
        np.testing.assert_array_equal(pixels.permute(1, 2, 0).numpy(), expected)
        np.testing.assert_array_equal(np.asarray(load_image(ref, SAMPLE)), expected)


@pytest.mark.parametrize(
    "data, reason",
    [(encoded("RGB")[:-200], "undecodable_image"), (b"not an image", "undecodable_image")],
    ids=["truncated jpeg", "garbage"],
)
def test_bad_images_fail_with_their_reason(tmp_path, data, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(data)
    with pytest.raises(DataError) as err:
        load_pixels(str(path), SAMPLE)
    assert err.value.reason == reason
    with pytest.raises(DataError) as err:
        load_pixels(str(tmp_path / "missing.jpg"), SAMPLE)
    assert err.value.reason == "missing_file"


@pytest.mark.parametrize("layout", [Resize(), Letterbox(), AnyRes(), Resize(resampler="pil")], ids=repr)
def test_transform_loads_in_the_layouts_form_and_ships_its_crops(tmp_path, layout):
    path = tmp_path / "photo.jpg"
    path.write_bytes(encoded("RGB", size=(90, 50)))
    transform = ImageTransform(32, layout)
    image = transform.load(str(path), SAMPLE)
    assert isinstance(image, torch.Tensor if layout.resampler == "torch" else Image.Image)
    pixels = transform(image)  # [k, 3, S, S]
    assert pixels.dtype == torch.uint8 and pixels.is_contiguous()
    assert pixels.shape == (transform.num_crops(90, 50), 3, 32, 32)
    crops = layout.crops(Image.open(path), 32)  # from the PIL image: the same crops
    np.testing.assert_array_equal(
        pixels.permute(0, 2, 3, 1).numpy(), np.stack([np.asarray(c) for c in crops])
    )
