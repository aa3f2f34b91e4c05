"""Vision towers: feature-layer semantics, CLS handling, loading from saved checkpoints (HF and open_clip)."""

import json

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

from lit_mllm.nn.vision import HFVisionTower, OpenCLIPTower, TinyCLIPVision
from lit_mllm.nn.vision.base import layers_to_keep
from lit_mllm.nn.vision.hf import _block_list
from tests.conftest import tiny_clip_vision_config


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
    import open_clip

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**cfg).eval()
    torch.save(model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")

    tower = OpenCLIPTower(f"local-dir:{tmp_path}", feature_layer=-2).eval()
    assert (tower.hidden_size, tower.num_features, tower.grid) == (32, 16, (4, 4))
    x = torch.randn(2, 3, 32, 32)
    # reference: the untruncated model's penultimate block output, read independently
    ref = model.visual.forward_intermediates(x, indices=[1], intermediates_only=True, output_fmt="NLC")
    torch.testing.assert_close(tower(x), ref["image_intermediates"][0])
    assert OpenCLIPTower(f"local-dir:{tmp_path}", keep_cls=True)(x).shape == (2, 17, 32)
