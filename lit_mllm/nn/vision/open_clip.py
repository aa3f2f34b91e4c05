"""open_clip vision towers: a model name + pretrained tag (``ViT-L-14-336``, ``openai``), a checkpoint file
as ``pretrained``, or ``local-dir:/path`` / ``hf-hub:org/repo`` names. Only the visual half is kept.

Patch tokens are read with ``forward_intermediates`` from two kinds of visual tower:

* open_clip's own ``VisionTransformer`` (OpenAI CLIP, LAION / DataComp / DFN ViTs), one CLS token;
* ``TimmModel`` wrapping a timm ``VisionTransformer`` or ``Eva`` trunk (open_clip's SigLIP, EVA02, PE-core,
  ViTamin configs), with whatever prefix tokens the trunk has (CLS, registers, or none as in SigLIP).

Other towers (ResNets, ConvNeXt, FastViT) have no patch-token sequence and are refused.

``image_size`` is open_clip's ``force_image_size``: the position table is resampled when the checkpoint loads
(open_clip ``resize_pos_embed`` / timm ``set_input_size``, bicubic with antialiasing, CLS position kept).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lit_mllm.nn.vision.base import VisionTower, layers_to_keep

_WORKS_WITH = (
    "open_clip VisionTransformer towers and TimmModel towers whose trunk is a timm VisionTransformer or Eva "
    "(e.g. ViT-*, ViT-*-SigLIP-*, EVA02-*, PE-Core-*)"
)


def _timm_trunk_classes() -> tuple[type, ...]:
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer, Eva


class OpenCLIPTower(VisionTower):
    """The visual tower of an open_clip model; features are the output of block ``feature_layer``."""

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        feature_layer: int = -2,
        keep_cls: bool = False,
        image_size: int | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        """
        Args:
            model_name: open_clip architecture name (``ViT-B-16``), or ``local-dir:PATH`` / ``hf-hub:ORG/REPO``.
            pretrained: Pretrained tag (``openai``, ``laion2b_s34b_b88k``) or a checkpoint file; None = random init.
            feature_layer: Block whose output is read (1 = first, -1 = last, -2 = penultimate).
            keep_cls: Keep the prefix tokens (CLS, registers) in the output.
            image_size: Override the input resolution (positional embeddings are interpolated by open_clip).
            gradient_checkpointing: Recompute the blocks in the backward pass (open_clip's / timm's
                ``set_grad_checkpointing``, non-reentrant).
        """
        super().__init__()
        import open_clip
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer

        model = open_clip.create_model(
            model_name, pretrained=pretrained, force_image_size=image_size, weights_only=True
        )
        visual = model.visual
        cfg = visual.preprocess_cfg
        self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])
        self.keep_cls = keep_cls
        self.feature_layer = feature_layer
        if isinstance(visual, VisionTransformer):
            self.image_size = visual.image_size[0]
            self.patch_size = visual.patch_size[0]
            self.hidden_size = visual.transformer.width
            self.num_prefix_tokens = 1  # open_clip's ViT always has a class token
            num_blocks = len(visual.transformer.resblocks)
        elif isinstance(visual, TimmModel) and isinstance(visual.trunk, _timm_trunk_classes()):
            trunk = visual.trunk
            # The trunk, not open_clip's config, knows the size it runs at (timm builds at its default size).
            rows, cols = trunk.patch_embed.grid_size
            if rows != cols:
                raise ValueError(f"open_clip model {model_name!r}: non-square patch grid {rows}x{cols}")
            self.image_size = trunk.patch_embed.img_size[0]
            self.patch_size = self.image_size // rows
            self.hidden_size = trunk.embed_dim
            self.num_prefix_tokens = trunk.num_prefix_tokens
            num_blocks = len(trunk.blocks)
        else:
            trunk = getattr(visual, "trunk", None)
            kind = type(visual).__name__ + (f" ({type(trunk).__name__} trunk)" if trunk is not None else "")
            raise ValueError(
                f"open_clip model {model_name!r} has a {kind} vision tower, which gives no patch-token sequence; "
                f"OpenCLIPTower works with {_WORKS_WITH}. Use HFVisionTower for other towers."
            )
        keep = layers_to_keep(feature_layer, num_blocks)
        # Keep blocks 1..keep; the final norm and pooling / projection read the last block, which may be gone.
        if isinstance(visual, VisionTransformer):
            visual.prune_intermediate_layers(indices=[keep - 1], prune_norm=True, prune_head=True)
        else:
            visual.trunk.prune_intermediate_layers(indices=[keep - 1], prune_norm=True, prune_head=True)
            visual.head = nn.Identity()
        self.visual = visual
        if gradient_checkpointing:
            self.enable_gradient_checkpointing()

    def enable_gradient_checkpointing(self) -> None:
        """open_clip's switch (its own ViT, or the timm trunk's); blocks are checkpointed non-reentrantly."""
        if hasattr(self.visual, "trunk"):
            self.visual.trunk.set_grad_checkpointing(True)  # TimmModel's own switch would only log a failure
        else:
            self.visual.set_grad_checkpointing(True)

    @property
    def blocks(self) -> nn.ModuleList:
        if not hasattr(self.visual, "trunk"):
            return self.visual.transformer.resblocks
        blocks = self.visual.trunk.blocks  # timm ViT: nn.Sequential, Eva: nn.ModuleList
        return blocks if isinstance(blocks, nn.ModuleList) else nn.ModuleList(blocks)

    def forward(self, pixel_values: Tensor) -> Tensor:
        self.check_input(pixel_values)
        out = self.visual.forward_intermediates(
            pixel_values, indices=1, intermediates_only=True, output_fmt="NLC", output_extra_tokens=True
        )
        patches = out["image_intermediates"][-1]  # [B, R*C, D]
        if self.keep_cls and self.num_prefix_tokens:
            prefix = out["image_intermediates_prefix"][-1]  # [B, P, D]
            return torch.cat([prefix, patches], dim=1)  # [B, P + R*C, D]
        return patches
