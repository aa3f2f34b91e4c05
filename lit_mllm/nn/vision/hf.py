"""Hugging Face vision towers (CLIP, SigLIP, DINOv2, ...) by hub name or local path, plus a tiny randomly
initialised CLIP tower for offline runs and tests.

A full CLIP/SigLIP checkpoint (text + vision) is accepted: only its vision half is built and loaded.
"""

from __future__ import annotations

from torch import Tensor, nn

from lit_mllm.nn.vision.base import CLIP_MEAN, CLIP_STD, VisionTower, layers_to_keep

_DEFAULT_NORM = {"siglip_vision_model": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


def _block_list(model: nn.Module, num_layers: int) -> tuple[nn.Module, str, nn.ModuleList]:
    """Find the ModuleList holding the transformer blocks (``encoder.layers`` / ``encoder.layer``)."""
    for module in model.modules():
        for attr in ("layers", "layer"):
            blocks = getattr(module, attr, None)
            if isinstance(blocks, nn.ModuleList) and len(blocks) == num_layers:
                return module, attr, blocks
    raise ValueError(f"could not find the {num_layers} transformer blocks of {type(model).__name__}")


class HFVisionTower(VisionTower):
    """A ``transformers`` vision model; features are ``hidden_states[feature_layer]``."""

    def __init__(
        self,
        name_or_path: str,
        feature_layer: int = -2,
        keep_cls: bool = False,
        trust_remote_code: bool = False,
    ) -> None:
        """
        Args:
            name_or_path: Hub name (e.g. ``openai/clip-vit-large-patch14-336``) or a local folder saved with
                ``save_pretrained``; a full CLIP/SigLIP checkpoint contributes only its vision half.
            feature_layer: Block whose output is read (1 = first, -1 = last block, -2 = penultimate).
            keep_cls: Keep the CLS token in the output (LLaVA ``full``) instead of dropping it (``default``).
            trust_remote_code: Allow code shipped with the checkpoint to run; off unless you trust the source.
        """
        super().__init__()
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        config = getattr(config, "vision_config", None) or config
        model = AutoModel.from_pretrained(name_or_path, config=config, trust_remote_code=trust_remote_code)
        mean, std = self._normalisation(name_or_path, config.model_type)
        self._wrap(model, feature_layer, keep_cls, mean, std)

    @staticmethod
    def _normalisation(name_or_path: str, model_type: str) -> tuple[tuple, tuple]:
        try:
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(name_or_path)
            return tuple(processor.image_mean), tuple(processor.image_std)
        except (OSError, ValueError, TypeError, AttributeError):  # no preprocessor_config.json saved
            return _DEFAULT_NORM.get(model_type, (CLIP_MEAN, CLIP_STD))

    def _wrap(self, model: nn.Module, feature_layer: int, keep_cls: bool, mean: tuple, std: tuple) -> None:
        config = model.config
        self.feature_layer = feature_layer
        self.keep_cls = keep_cls
        self.hidden_size = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.mean, self.std = tuple(mean), tuple(std)
        embeddings = getattr(getattr(model, "vision_model", model), "embeddings", None)
        has_cls = any(hasattr(embeddings, a) for a in ("class_embedding", "cls_token"))
        self.num_prefix_tokens = int(has_cls) + getattr(config, "num_register_tokens", 0)
        parent, attr, blocks = _block_list(model, config.num_hidden_layers)
        keep = layers_to_keep(feature_layer, len(blocks))
        setattr(parent, attr, nn.ModuleList(list(blocks)[:keep]))
        config.num_hidden_layers = keep
        if hasattr(config, "vision_use_head"):  # SigLIP's pooling head reads the dropped last layer
            config.vision_use_head = False
            getattr(model, "vision_model", model).head = None
        self.model = model

    def forward(self, pixel_values: Tensor) -> Tensor:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        return self.select(out.hidden_states[-1])  # [B, N, D]


class TinyCLIPVision(HFVisionTower):
    """A randomly initialised ``CLIPVisionModel`` small enough for CPU runs and tests."""

    def __init__(
        self,
        image_size: int = 64,
        patch_size: int = 8,
        hidden_size: int = 64,
        num_layers: int = 3,
        num_heads: int = 4,
        feature_layer: int = -2,
        keep_cls: bool = False,
    ) -> None:
        """
        Args:
            image_size: Input side in pixels.
            patch_size: Patch side in pixels; (image_size / patch_size)^2 patch features per image.
            hidden_size: Feature width.
            num_layers: Transformer blocks before truncation at ``feature_layer``.
            num_heads: Attention heads.
            feature_layer: Hidden state to read, as in :class:`HFVisionTower`.
            keep_cls: Keep the CLS token.
        """
        nn.Module.__init__(self)
        from transformers import CLIPVisionConfig, CLIPVisionModel

        config = CLIPVisionConfig(
            image_size=image_size,
            patch_size=patch_size,
            hidden_size=hidden_size,
            intermediate_size=4 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
        )
        self._wrap(CLIPVisionModel(config), feature_layer, keep_cls, CLIP_MEAN, CLIP_STD)
