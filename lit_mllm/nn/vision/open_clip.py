"""open_clip vision towers: a model name + pretrained tag (``ViT-L-14-336``, ``openai``), a checkpoint file
as ``pretrained``, or ``local-dir:/path`` / ``hf-hub:org/repo`` names. Only the visual half is kept.

Patch tokens are read with open_clip's ``forward_intermediates`` from its ``VisionTransformer``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_mllm.nn.vision.base import VisionTower, layers_to_keep


class OpenCLIPTower(VisionTower):
    """The visual tower of an open_clip CLIP model; features are the output of block ``feature_layer``."""

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        feature_layer: int = -2,
        keep_cls: bool = False,
        image_size: int | None = None,
    ) -> None:
        """
        Args:
            model_name: open_clip architecture name (``ViT-B-16``), or ``local-dir:PATH`` / ``hf-hub:ORG/REPO``.
            pretrained: Pretrained tag (``openai``, ``laion2b_s34b_b88k``) or a checkpoint file; None = random init.
            feature_layer: Block whose output is read (1 = first, -1 = last, -2 = penultimate).
            keep_cls: Keep the CLS token in the output.
            image_size: Override the input resolution (positional embeddings are interpolated by open_clip).
        """
        super().__init__()
        import open_clip
        from open_clip.transformer import VisionTransformer

        model = open_clip.create_model(
            model_name, pretrained=pretrained, force_image_size=image_size, weights_only=True
        )
        visual = model.visual
        if not isinstance(visual, VisionTransformer):
            raise ValueError(
                f"open_clip model {model_name!r} has a {type(visual).__name__} vision tower; OpenCLIPTower reads "
                "patch tokens from open_clip VisionTransformer towers only. Use HFVisionTower for other towers."
            )
        cfg = visual.preprocess_cfg
        self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])
        self.image_size = visual.image_size[0]
        self.patch_size = visual.patch_size[0]
        self.hidden_size = visual.transformer.width
        self.num_prefix_tokens = 1
        self.keep_cls = keep_cls
        self.feature_layer = feature_layer
        blocks = visual.transformer.resblocks
        del blocks[layers_to_keep(feature_layer, len(blocks)) :]
        # Pooling / projection read the last block, which may be gone: drop them so nothing can call them.
        visual.proj = None
        self.visual = visual

    def forward(self, pixel_values: Tensor) -> Tensor:
        out = self.visual.forward_intermediates(
            pixel_values, indices=1, intermediates_only=True, output_fmt="NLC", output_extra_tokens=True
        )
        patches = out["image_intermediates"][-1]  # [B, R*C, D]
        if self.keep_cls:
            return torch.cat([out["image_intermediates_prefix"][-1], patches], dim=1)  # [B, 1 + R*C, D]
        return patches
