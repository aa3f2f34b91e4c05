"""Vision towers: feature-layer semantics, CLS handling, loading from saved checkpoints (HF and open_clip)."""

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

from lit_mllm.nn.vision import HFVisionTower, OpenCLIPTower, TinyCLIPVision
from lit_mllm.nn.vision.base import layers_to_keep
from lit_mllm.nn.vision.hf import _block_list
from tests.conftest import tiny_clip_vision_config
from tests.stand_ins import save_open_clip


@pytest.mark.parametrize("feature_layer", [-1, -2, 1, 3])
@pytest.mark.parametrize("keep_cls", [False, True])
def test_hf_tower_reads_hidden_state(tmp_path, feature_layer, keep_cls):
    torch.manual_seed(0)
    ref = CLIPVisionModel(tiny_clip_vision_config()).eval()
    ref.save_pretrained(tmp_path)
    tower = HFVisionTower(str(tmp_path), feature_layer=feature_layer, keep_cls=keep_cls).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = ref(pixel_values=x, output_hidden_states=True).hidden_states[feature_layer]
    expected = expected if keep_cls else expected[:, 1:]
    got = tower(x)
    assert got.shape == (2, tower.num_features, 32)
    assert tower.num_features == 16 + keep_cls
    torch.testing.assert_close(got, expected)
    # blocks past the feature layer are gone
    assert len(_block_list(tower.model, layers_to_keep(feature_layer, 3))[2]) == layers_to_keep(
        feature_layer, 3
    )


def test_hf_tower_takes_vision_half_of_full_clip(tmp_path):
    torch.manual_seed(0)
    full = CLIPModel(
        CLIPConfig(
            vision_config=tiny_clip_vision_config().to_dict(),
            text_config={
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "vocab_size": 50,
            },
        )
    )
    full.save_pretrained(tmp_path)
    tower = HFVisionTower(str(tmp_path), feature_layer=-1)
    ours = tower.model.embeddings.patch_embedding.weight
    assert torch.equal(ours, full.vision_model.embeddings.patch_embedding.weight)


def test_feature_layer_out_of_range():
    for bad in (-3, 0, 3):
        with pytest.raises(ValueError, match="out of range"):
            TinyCLIPVision(num_layers=2, feature_layer=bad)


def test_open_clip_local_dir(tmp_path):
    model = _save_open_clip(tmp_path)

    tower = OpenCLIPTower(f"local-dir:{tmp_path}", feature_layer=-2).eval()
    assert (tower.hidden_size, tower.num_features, tower.grid) == (32, 16, (4, 4))
    x = torch.randn(2, 3, 32, 32)
    # reference: the untruncated model's penultimate block output, read independently
    ref = model.visual.forward_intermediates(x, indices=[1], intermediates_only=True, output_fmt="NLC")
    torch.testing.assert_close(tower(x), ref["image_intermediates"][0])
    assert OpenCLIPTower(f"local-dir:{tmp_path}", keep_cls=True)(x).shape == (2, 17, 32)


def test_hf_image_size_native_is_untouched(tmp_path):
    torch.manual_seed(0)
    ref = CLIPVisionModel(tiny_clip_vision_config()).eval()
    ref.save_pretrained(tmp_path)
    tower = HFVisionTower(str(tmp_path), feature_layer=-2, image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(tower(x), ref(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:])
    assert torch.equal(
        tower.model.embeddings.position_embedding.weight, ref.embeddings.position_embedding.weight
    )


def test_hf_image_size_interpolates_position_table(tmp_path):
    torch.manual_seed(0)
    ref = CLIPVisionModel(tiny_clip_vision_config()).eval()
    ref.save_pretrained(tmp_path)
    tower = HFVisionTower(str(tmp_path), feature_layer=-2, keep_cls=True, image_size=64).eval()
    assert (tower.image_size, tower.grid, tower.num_features) == (64, (8, 8), 1 + 64)
    assert tower.model.config.image_size == 64
    # the table: CLS row kept, the 4x4 grid resampled bicubically to 8x8
    old = ref.embeddings.position_embedding.weight.detach()  # [1 + 16, 32]
    grid = old[1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)
    expected = torch.cat([old[:1], grid.permute(0, 2, 3, 1).reshape(64, 32)])
    new = tower.model.embeddings.position_embedding.weight
    torch.testing.assert_close(new, expected)
    assert new.requires_grad and tower.model.embeddings.position_ids.shape == (1, 65)
    # at 2x side: 4x patch tokens, equal to transformers' own per-forward interpolation
    x = torch.randn(2, 3, 64, 64)
    got = tower(x)
    assert got.shape == (2, 65, 32)
    out = ref(pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=True)
    torch.testing.assert_close(got, out.hidden_states[-2])
    with pytest.raises(ValueError, match="takes 64x64 images"):
        tower(torch.randn(1, 3, 32, 32))


def test_hf_image_size_must_fit_patches(tmp_path):
    CLIPVisionModel(tiny_clip_vision_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="multiple of .* patch size 8"):
        HFVisionTower(str(tmp_path), image_size=60)


@pytest.mark.parametrize("feature_layer", [-1, -2, 1])
def test_blocks_are_the_remaining_blocks(feature_layer):
    torch.manual_seed(0)
    tower = TinyCLIPVision(32, 8, hidden_size=32, num_layers=3, num_heads=2, feature_layer=feature_layer)
    keep = layers_to_keep(feature_layer, 3)
    assert len(tower.blocks) == keep
    assert tower.blocks is _block_list(tower.model, keep)[2]
    # training the last block only: gradients reach it and nothing earlier
    tower.requires_grad_(False)
    for block in tower.last_blocks(1):
        block.requires_grad_(True)
    tower(torch.randn(1, 3, 32, 32)).sum().backward()
    trained = {n for n, p in tower.named_parameters() if p.grad is not None}
    assert trained and trained == {n for n, p in tower.named_parameters() if p.requires_grad}
    assert all(p.grad is not None for p in tower.blocks[-1].parameters())
    with pytest.raises(ValueError, match=f"last {keep + 1} blocks"):
        tower.last_blocks(keep + 1)


def _save_open_clip(tmp_path):
    torch.manual_seed(0)
    vision = {"image_size": 32, "layers": 3, "width": 32, "head_width": 16, "patch_size": 8}
    return save_open_clip(tmp_path, vision)


def test_open_clip_image_size(tmp_path):
    model = _save_open_clip(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    native = OpenCLIPTower(f"local-dir:{tmp_path}", feature_layer=-1, image_size=32).eval()
    ref = model.visual.forward_intermediates(x, indices=[2], intermediates_only=True, output_fmt="NLC")
    assert torch.equal(native(x), ref["image_intermediates"][0])

    tower = OpenCLIPTower(f"local-dir:{tmp_path}", feature_layer=-1, image_size=64).eval()
    assert (tower.image_size, tower.grid, tower.num_features) == (64, (8, 8), 64)
    old = model.visual.positional_embedding.detach()  # [1 + 16, 32]
    grid = old[1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    # open_clip's resize_pos_embed resamples with antialiasing
    grid = torch.nn.functional.interpolate(
        grid, size=(8, 8), mode="bicubic", align_corners=False, antialias=True
    )
    expected = torch.cat([old[:1], grid.permute(0, 2, 3, 1).reshape(64, 32)])
    torch.testing.assert_close(tower.visual.positional_embedding, expected)
    assert tower(torch.randn(2, 3, 64, 64)).shape == (2, 64, 32)


def test_open_clip_blocks(tmp_path):
    _save_open_clip(tmp_path)
    tower = OpenCLIPTower(f"local-dir:{tmp_path}", feature_layer=2)
    assert len(tower.blocks) == 2 and tower.blocks is tower.visual.transformer.resblocks
    assert tower.visual.proj is None
