"""The vision-tower zoo: DINOv2 (+ registers) and SigLIP through HFVisionTower, timm trunks through OpenCLIPTower,
position-table resampling for each, and fused towers (Prismatic concat, POINTS average). All tiny, random, saved
to tmp dirs and loaded through the real loading code."""

import pytest
import torch
import torch.nn.functional as F

from lit_mllm.nn.vision import FusedTowers, HFVisionTower, OpenCLIPTower, TinyCLIPVision, VisionTower
from lit_mllm.nn.vision.base import CLIP_MEAN, CLIP_STD
from tests.stand_ins import save_open_clip


def tiny(kind: str):
    """A tiny random HF vision model of ``kind`` and its number of prefix tokens."""
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    common = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=2)
    torch.manual_seed(0)
    if kind == "dinov2":
        return Dinov2Model(Dinov2Config(mlp_ratio=2, **common)).eval(), 1
    if kind == "dinov2_reg":
        config = Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=2, **common)
        return Dinov2WithRegistersModel(config).eval(), 3
    return SiglipVisionModel(SiglipVisionConfig(intermediate_size=64, **common)).eval(), 0


@pytest.mark.parametrize(
    "kind,feature_layer",
    [("dinov2", -2), ("dinov2_reg", -2), ("dinov2_reg", 3), ("siglip", -2), ("siglip", 3)],
)
def test_hf_families_read_hidden_state(tmp_path, kind, feature_layer):
    ref, prefix = tiny(kind)
    ref.save_pretrained(tmp_path)
    tower = HFVisionTower(str(tmp_path), feature_layer=feature_layer).eval()
    assert tower.num_prefix_tokens == prefix and (tower.grid, tower.num_features) == ((4, 4), 16)
    x = torch.randn(2, 3, 32, 32)
    expected = ref(pixel_values=x, output_hidden_states=True).hidden_states[feature_layer][:, prefix:]
    torch.testing.assert_close(tower(x), expected)
    full = HFVisionTower(str(tmp_path), feature_layer=feature_layer, keep_cls=True).eval()
    assert full(x).shape == (2, 16 + prefix, 32) == (2, full.num_features, 32)
    if kind.startswith("dinov2"):
        assert tower.mean == (0.485, 0.456, 0.406)  # ImageNet statistics without a saved processor
    assert len(tower.blocks) == (2 if feature_layer == -2 else 3)


@pytest.mark.parametrize(
    "kind,side",
    [("dinov2", 64), ("dinov2_reg", 64), ("siglip", 64), ("dinov2", 16)],  # 16: shrink, as 518 -> 224
)
def test_hf_families_image_size(tmp_path, kind, side):
    ref, prefix = tiny(kind)
    ref.save_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    native = HFVisionTower(str(tmp_path), feature_layer=-1, image_size=32).eval()
    assert torch.equal(
        native(x), ref(pixel_values=x, output_hidden_states=True).hidden_states[-1][:, prefix:]
    )

    tower = HFVisionTower(str(tmp_path), feature_layer=-1, image_size=side).eval()
    rows = side // 8
    assert (tower.image_size, tower.grid, tower.num_features) == (side, (rows, rows), rows * rows)
    # transformers interpolates per forward (DINOv2 always, SigLIP when asked); we did it once at build time
    x = torch.randn(2, 3, side, side)
    extra = {} if kind.startswith("dinov2") else {"interpolate_pos_encoding": True}
    expected = ref(pixel_values=x, output_hidden_states=True, **extra).hidden_states[-1][:, prefix:]
    torch.testing.assert_close(tower(x), expected)


def test_dinov2_table_is_bicubic_of_grid(tmp_path):
    ref, _ = tiny("dinov2")
    ref.save_pretrained(tmp_path)
    tower = HFVisionTower(str(tmp_path), image_size=64)
    old = ref.embeddings.position_embeddings[0].detach()  # [1 + 16, 32]
    grid = old[1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)
    expected = torch.cat([old[:1], grid.permute(0, 2, 3, 1).reshape(64, 32)])[None]
    torch.testing.assert_close(tower.model.embeddings.position_embeddings, expected)
    assert tower.model.embeddings.patch_embeddings.image_size == (64, 64)


# ---------------------------------------------------------------- open_clip with timm trunks


def save_timm_clip(tmp_path, timm_name: str, pool: str, proj: str):
    """An open_clip CLIP whose vision tower is the tiny timm model ``timm_name`` (built at 160 px), saved as a
    ``local-dir:`` folder; timm weights are never downloaded (``timm_model_pretrained: false``)."""
    vision = {
        "timm_model_name": timm_name,
        "timm_model_pretrained": False,
        "timm_pool": pool,
        "timm_proj": proj,
        "image_size": 160,
    }
    torch.manual_seed(0)
    return save_open_clip(tmp_path, vision, {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]})


def block_output(trunk, index: int, x):
    """Output of timm block ``index`` (0-based) from an ordinary forward, caught with a hook."""
    seen = {}
    handle = trunk.blocks[index].register_forward_hook(lambda m, i, o: seen.setdefault("x", o))
    trunk(x)
    handle.remove()
    return seen["x"]


@pytest.mark.parametrize(
    "timm_name,pool,proj,feature_layer,keep_cls",
    [
        ("test_vit", "", "linear", -2, False),  # CLS token, avg-pool head
        ("test_vit3", "map", "none", 2, True),  # SigLIP-style: no CLS, one register, attention-pool head
    ],
)
def test_open_clip_timm_trunk(tmp_path, timm_name, pool, proj, feature_layer, keep_cls):
    model = save_timm_clip(tmp_path, timm_name, pool, proj)
    trunk = model.visual.trunk
    tower = OpenCLIPTower(f"local-dir:{tmp_path}", feature_layer=feature_layer, keep_cls=keep_cls).eval()
    keep = feature_layer if feature_layer > 0 else len(trunk.blocks) + 1 + feature_layer
    assert (tower.image_size, tower.patch_size, tower.grid, tower.hidden_size) == (
        160,
        16,
        (10, 10),
        64 + 32 * (timm_name == "test_vit3"),
    )
    assert (tower.num_prefix_tokens, tower.mean, tower.std) == (1, (0.5,) * 3, (0.5,) * 3)
    assert tower.num_features == 100 + keep_cls
    assert len(tower.blocks) == keep and all(a is b for a, b in zip(tower.blocks, tower.visual.trunk.blocks))
    x = torch.randn(1, 3, 160, 160)
    expected = block_output(trunk, keep - 1, x)  # [B, 1 + 100, D]
    torch.testing.assert_close(tower(x), expected if keep_cls else expected[:, 1:])


def test_open_clip_timm_image_size(tmp_path):
    model = save_timm_clip(tmp_path, "test_vit", "", "linear")
    x = torch.randn(1, 3, 160, 160)
    native = OpenCLIPTower(f"local-dir:{tmp_path}", feature_layer=-1, image_size=160).eval()
    assert torch.equal(native(x), block_output(model.visual.trunk, 5, x)[:, 1:])

    tower = OpenCLIPTower(f"local-dir:{tmp_path}", feature_layer=-1, image_size=320).eval()
    assert (tower.image_size, tower.grid, tower.num_features) == (320, (20, 20), 400)
    old = model.visual.trunk.pos_embed[0].detach()  # [1 + 100, 64]
    grid = old[1:].reshape(1, 10, 10, 64).permute(0, 3, 1, 2)
    # timm's set_input_size resamples with antialiasing
    grid = F.interpolate(grid, size=(20, 20), mode="bicubic", align_corners=False, antialias=True)
    expected = torch.cat([old[:1], grid.permute(0, 2, 3, 1).reshape(400, 64)])[None]
    torch.testing.assert_close(tower.visual.trunk.pos_embed, expected)
    assert tower(torch.randn(1, 3, 320, 320)).shape == (1, 400, 64)


def test_open_clip_refuses_non_vit_trunk(tmp_path):
    save_timm_clip(tmp_path, "test_convnext", "avg", "linear")
    with pytest.raises(ValueError, match="ConvNeXt trunk.*timm VisionTransformer or Eva"):
        OpenCLIPTower(f"local-dir:{tmp_path}")


# ---------------------------------------------------------------- fused towers


def tiny_clip(**kw) -> TinyCLIPVision:
    torch.manual_seed(kw.pop("seed", 0))
    return TinyCLIPVision(
        **{"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_heads": 2, **kw}
    ).eval()


@pytest.fixture
def siglip_tower(tmp_path) -> HFVisionTower:
    tiny("siglip")[0].save_pretrained(tmp_path)
    return HFVisionTower(str(tmp_path)).eval()


def normalise(x, mean, std):
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_fused_concat_normalises_per_tower(siglip_tower):
    clip = tiny_clip(hidden_size=16, num_heads=2)
    fused = FusedTowers([clip, siglip_tower], mode="concat").eval()
    assert (fused.hidden_size, fused.num_features, fused.grid, fused.image_size) == (48, 16, (4, 4), 32)
    assert (fused.mean, fused.std) == ((0.0,) * 3, (1.0,) * 3)  # the data pipeline only scales to [0, 1]
    x = torch.rand(2, 3, 32, 32)  # pixels in [0, 1]
    expected = torch.cat(
        [clip(normalise(x, CLIP_MEAN, CLIP_STD)), siglip_tower(normalise(x, (0.5,) * 3, (0.5,) * 3))], -1
    )
    torch.testing.assert_close(fused(x), expected)
    assert fused(x).shape == (2, 16, 48)


def test_fused_average(siglip_tower):
    clip = tiny_clip()
    fused = FusedTowers([clip, siglip_tower], mode="average").eval()
    x = torch.rand(2, 3, 32, 32)
    expected = (
        clip(normalise(x, CLIP_MEAN, CLIP_STD)) + siglip_tower(normalise(x, (0.5,) * 3, (0.5,) * 3))
    ) / 2
    torch.testing.assert_close(fused(x), expected)
    assert fused.hidden_size == 32


def test_fused_refuses_mismatches(siglip_tower):
    with pytest.raises(ValueError, match=r"grid 4x4.*grid 8x8.*image_size=<side>"):
        FusedTowers([siglip_tower, tiny_clip(patch_size=4)])
    with pytest.raises(ValueError, match=r"image_size 32.*image_size 64"):
        FusedTowers([siglip_tower, tiny_clip(image_size=64, patch_size=16)])
    with pytest.raises(ValueError, match="keep_cls=False"):
        FusedTowers([siglip_tower, tiny_clip(keep_cls=True)])
    with pytest.raises(ValueError, match="one width.*width 32.*width 16"):
        FusedTowers([siglip_tower, tiny_clip(hidden_size=16)], mode="average")
    with pytest.raises(ValueError, match="at least two"):
        FusedTowers([siglip_tower])


def test_fused_blocks():
    a, b = tiny_clip(num_layers=3), tiny_clip(num_layers=4, seed=1)  # 2 and 3 blocks after feature_layer=-2
    fused = FusedTowers([a, b])
    assert len(fused.blocks) == 5 and all(x is y for x, y in zip(fused.blocks, [*a.blocks, *b.blocks]))
    assert fused.last_blocks(1) == [a.blocks[-1], b.blocks[-1]]


def test_fused_from_config():
    """The fused tower is built from YAML-style ``class_path`` / ``init_args`` like every other tower."""
    from jsonargparse import ArgumentParser

    tiny_args = {"image_size": 32, "patch_size": 8, "hidden_size": 16, "num_layers": 2, "num_heads": 2}
    parser = ArgumentParser()
    parser.add_argument("--tower", type=VisionTower)
    cfg = parser.parse_object(
        {
            "tower": {
                "class_path": "lit_mllm.nn.vision.FusedTowers",
                "init_args": {
                    "towers": [{"class_path": "lit_mllm.nn.vision.TinyCLIPVision", "init_args": tiny_args}]
                    * 2,
                    "mode": "concat",
                },
            }
        }
    )
    tower = parser.instantiate_classes(cfg).tower
    assert isinstance(tower, FusedTowers) and tower.hidden_size == 32
    assert tower(torch.rand(1, 3, 32, 32)).shape == (1, 16, 32)


def test_fused_matches_each_tower_with_its_own_transform(siglip_tower):
    """Through the real data transform: the fused tower's [0, 1] input gives what each tower gets from its own."""
    import numpy as np
    from PIL import Image

    from lit_mllm.data.images import ImageTransform, normalize

    clip = tiny_clip()
    fused = FusedTowers([clip, siglip_tower]).eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    own = [normalize(ImageTransform(t.image_size)(image), t.mean, t.std) for t in (clip, siglip_tower)]
    pixels = normalize(ImageTransform(fused.image_size)(image), fused.mean, fused.std)  # [1, 3, S, S]
    torch.testing.assert_close(fused(pixels), torch.cat([clip(own[0]), siglip_tower(own[1])], -1))
