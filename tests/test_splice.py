"""Prefix splicing: properties (features land at image positions in order, text untouched) and errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_mllm.nn.fusion.prefix import ImageTokenMismatch, splice_image_features

IMG = 7


@st.composite
def layouts(draw):
    per_image = draw(st.integers(1, 4))
    samples = []
    for _ in range(draw(st.integers(1, 4))):
        pieces = []
        for _ in range(draw(st.integers(0, 3))):
            pieces += draw(st.lists(st.integers(0, 6), max_size=5)) + [IMG] * per_image
        pieces += draw(st.lists(st.integers(0, 6), min_size=1, max_size=5))
        samples.append(pieces)
    return per_image, samples


@settings(max_examples=80, deadline=None)
@given(layouts())
def test_features_land_at_image_positions_in_order(layout):
    per_image, samples = layout
    length = max(map(len, samples))
    ids = torch.zeros(len(samples), length, dtype=torch.long)
    for b, s in enumerate(samples):
        ids[b, : len(s)] = torch.tensor(s)
    counts = [s.count(IMG) // per_image for s in samples]
    text = torch.randn(len(samples), length, 5)
    images = torch.randn(sum(counts), per_image, 5) if sum(counts) else None
    out = splice_image_features(text, ids, IMG, images, counts)
    expected_rows = iter(images.reshape(-1, 5)) if images is not None else iter(())
    for b in range(len(samples)):
        for pos in range(length):
            if ids[b, pos] == IMG:
                assert torch.equal(out[b, pos], next(expected_rows))
            else:
                assert torch.equal(out[b, pos], text[b, pos])
    assert next(expected_rows, None) is None


def test_mismatch_names_the_sample():
    ids = torch.tensor([[1, IMG, IMG, 2], [1, IMG, 2, 3]])
    with pytest.raises(
        ImageTokenMismatch, match=r"sample 'b' has 1 image tokens .* 1 image\(s\) x 2 features = 2"
    ):
        splice_image_features(torch.zeros(2, 4, 3), ids, IMG, torch.zeros(2, 2, 3), [1, 1], ["a", "b"])
    with pytest.raises(ImageTokenMismatch, match="lists 1 images but 2"):
        splice_image_features(torch.zeros(2, 4, 3), ids, IMG, torch.zeros(2, 2, 3), [1, 0], ["a", "b"])


def test_gradient_flows_to_image_features():
    ids = torch.tensor([[IMG, IMG, 1]])
    images = torch.randn(1, 2, 3, requires_grad=True)
    splice_image_features(torch.zeros(1, 3, 3), ids, IMG, images, [1]).sum().backward()
    assert torch.equal(images.grad, torch.ones(1, 2, 3))
