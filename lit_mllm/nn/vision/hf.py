"""Hugging Face vision towers (CLIP, SigLIP, DINOv2 with or without registers, ...) by hub name or local path,
plus a tiny randomly initialised CLIP tower for offline runs and tests.

A full CLIP/SigLIP checkpoint (text + vision) is accepted: only its vision half is built and loaded.

``image_size`` runs a tower at another resolution than it was trained at (MM1 goes to 378 px; Prismatic runs
DINOv2, trained at 518, at 224 or 384). The learned position table is resampled once, at build time, bicubically
on its 2D grid with the CLS position kept -- the same resampling ``transformers`` applies on every forward under
``interpolate_pos_encoding=True`` -- and the config and buffers (``position_ids``) are updated to match. The
resized table is then a plain parameter of the new size: no per-forward interpolation, trainable directly, and
``image_size`` / ``grid`` / ``num_features`` describe what the tower really takes and gives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_mllm.nn.vision.base import CLIP_MEAN, CLIP_STD, VisionTower, layers_to_keep, tower_state

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_DEFAULT_NORM = {
    "siglip_vision_model": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dinov2": (IMAGENET_MEAN, IMAGENET_STD),
    "dinov2_with_registers": (IMAGENET_MEAN, IMAGENET_STD),
}
# Families whose transformers ``interpolate_pos_encoding`` resamples with antialiasing; the rest do not.
_ANTIALIAS_POSITIONS = {"dinov2_with_registers"}
# Families whose final norm (``post_layernorm`` / ``layernorm``) only feeds outputs the tower never reads.
_UNREAD_FINAL_NORM = {"clip_vision_model", "siglip_vision_model", "dinov2", "dinov2_with_registers"}
_POSITION_FAMILIES = "CLIP, SigLIP, DINOv2 and DINOv2-with-registers"


def _block_list(model: nn.Module, num_layers: int) -> tuple[nn.Module, str, nn.ModuleList]:
    """Find the ModuleList holding the transformer blocks (``encoder.layers`` / ``encoder.layer``)."""
    for module in model.modules():
        for attr in ("layers", "layer"):
            blocks = getattr(module, attr, None)
            if isinstance(blocks, nn.ModuleList) and len(blocks) == num_layers:
                return module, attr, blocks
    raise ValueError(f"could not find the {num_layers} transformer blocks of {type(model).__name__}")


def resample_grid(table: Tensor, num_prefix: int, side: int, antialias: bool = False) -> Tensor:
    """Resample a square position table ``[P + S*S, D] -> [P + side*side, D]`` bicubically on its grid; the
    ``P`` prefix (CLS) rows are kept. Computed in float32, returned in the table's dtype."""
    prefix, grid = table[:num_prefix], table[num_prefix:]  # [P, D], [S*S, D]
    old = int(round(grid.shape[0] ** 0.5))
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)  # [1, D, S, S]
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(side * side, dim).to(table.dtype)  # [side*side, D]
    return torch.cat([prefix, grid])


def _resize_positions(model: nn.Module, image_size: int) -> None:
    """Make ``model`` take ``image_size`` square inputs by resampling its learned position table in place."""
    config = model.config
    name = type(model).__name__
    patch, old_size = config.patch_size, config.image_size
    if not isinstance(old_size, int) or not isinstance(patch, int):
        raise ValueError(f"image_size: {name} has a non-square image_size/patch_size, which is not supported")
    if image_size == old_size:
        return
    if image_size <= 0 or image_size % patch:
        raise ValueError(
            f"image_size={image_size} is not a positive multiple of {name}'s patch size {patch}: "
            f"use e.g. {max(1, round(image_size / patch)) * patch}"
        )
    emb = getattr(getattr(model, "vision_model", model), "embeddings", None)
    table_module = getattr(emb, "position_embedding", None)
    table_param = getattr(emb, "position_embeddings", None)
    if isinstance(table_module, nn.Embedding):  # CLIP, SigLIP: nn.Embedding [T, D]
        table = table_module.weight
    elif isinstance(table_param, nn.Parameter) and table_param.dim() == 3:  # DINOv2: [1, T, D]
        table = table_param[0]
    else:
        raise ValueError(
            f"image_size={image_size}: don't know where {name} keeps a learned position table to resample; "
            f"supported: {_POSITION_FAMILIES}. Leave image_size unset to use its native {old_size} px."
        )
    old_side, side = old_size // patch, image_size // patch
    num_prefix = table.shape[0] - old_side**2
    if num_prefix not in (0, 1):
        raise ValueError(
            f"image_size: {name}'s position table has {table.shape[0]} rows, which is not a {old_side}x{old_side} "
            f"grid (+ CLS) for image_size {old_size} / patch {patch}; supported: {_POSITION_FAMILIES}"
        )
    antialias = config.model_type in _ANTIALIAS_POSITIONS
    with torch.no_grad():
        new = resample_grid(table.detach(), num_prefix, side, antialias=antialias)  # [P + side*side, D]
    num_positions = new.shape[0]
    if isinstance(table_module, nn.Embedding):
        resized = nn.Embedding(num_positions, new.shape[1], device=new.device, dtype=new.dtype)
        resized.weight = nn.Parameter(new, requires_grad=table_module.weight.requires_grad)
        emb.position_embedding = resized
    else:
        emb.position_embeddings = nn.Parameter(new[None], requires_grad=table_param.requires_grad)
    if isinstance(getattr(emb, "position_ids", None), Tensor):
        ids = torch.arange(num_positions, device=emb.position_ids.device).expand((1, -1))
        emb.register_buffer("position_ids", ids, persistent=False)
    for module in (emb, getattr(emb, "patch_embeddings", None)):
        if module is None:
            continue
        if isinstance(getattr(module, "image_size", None), int):
            module.image_size = image_size
        elif isinstance(getattr(module, "image_size", None), (tuple, list)):
            module.image_size = (image_size, image_size)
        if hasattr(module, "num_patches"):
            module.num_patches = side * side
    if hasattr(emb, "num_positions"):
        emb.num_positions = num_positions
    config.image_size = image_size


class HFVisionTower(VisionTower):
    """A ``transformers`` vision model; features are ``hidden_states[feature_layer]``."""

    def __init__(
        self,
        name_or_path: str,
        feature_layer: int = -2,
        keep_cls: bool = False,
        trust_remote_code: bool = False,
        image_size: int | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        """
        Args:
            name_or_path: Hub name (e.g. ``openai/clip-vit-large-patch14-336``) or a local folder saved with
                ``save_pretrained``; a full CLIP/SigLIP checkpoint contributes only its vision half. CLIP,
                SigLIP, DINOv2 and DINOv2-with-registers are tested.
            feature_layer: Block whose output is read (1 = first, -1 = last block, -2 = penultimate).
            keep_cls: Keep the prefix tokens (CLS, registers) in the output (LLaVA ``full``) instead of dropping
                them (``default``).
            trust_remote_code: Allow code shipped with the checkpoint to run; off unless you trust the source.
            image_size: Input side in pixels; None = the checkpoint's. Another value (a multiple of the patch
                size, e.g. 378 for a patch-14 tower) resamples the learned position embeddings bicubically once
                at build time (CLS position kept); the patch grid and feature count follow.
            gradient_checkpointing: Recompute the blocks in the backward pass (``transformers``' activation
                checkpointing, non-reentrant); it acts on the blocks that train, which are the ones in train mode.
        """
        super().__init__()
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        config = getattr(config, "vision_config", None) or config
        model = AutoModel.from_pretrained(name_or_path, config=config, trust_remote_code=trust_remote_code)
        mean, std = self._normalisation(name_or_path, config.model_type)
        self._wrap(model, feature_layer, keep_cls, mean, std, image_size)
        if gradient_checkpointing:
            self.enable_gradient_checkpointing()

    @staticmethod
    def _normalisation(name_or_path: str, model_type: str) -> tuple[tuple, tuple]:
        try:
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(name_or_path)
            return tuple(processor.image_mean), tuple(processor.image_std)
        except (OSError, ValueError, TypeError, AttributeError):  # no preprocessor_config.json saved
            return _DEFAULT_NORM.get(model_type, (CLIP_MEAN, CLIP_STD))

    def _wrap(
        self,
        model: nn.Module,
        feature_layer: int,
        keep_cls: bool,
        mean: tuple,
        std: tuple,
        image_size: int | None = None,
    ) -> None:
        config = model.config
        if image_size is not None:
            _resize_positions(model, image_size)
        self.feature_layer = feature_layer
        self.keep_cls = keep_cls
        self.hidden_size = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.mean, self.std = tuple(mean), tuple(std)
        vision = getattr(model, "vision_model", model)
        embeddings = getattr(vision, "embeddings", None)
        has_cls = any(hasattr(embeddings, a) for a in ("class_embedding", "cls_token"))
        self.num_prefix_tokens = int(has_cls) + getattr(config, "num_register_tokens", 0)
        parent, attr, blocks = _block_list(model, config.num_hidden_layers)
        keep = layers_to_keep(feature_layer, len(blocks))
        setattr(parent, attr, nn.ModuleList(list(blocks)[:keep]))
        parent_name = next(n for n, m in model.named_modules() if m is parent)
        self._blocks_path = f"{parent_name}.{attr}" if parent_name else attr
        config.num_hidden_layers = keep
        if hasattr(config, "vision_use_head"):  # SigLIP's pooling head reads the dropped last layer
            config.vision_use_head = False
            vision.head = None
            if hasattr(vision, "use_head"):  # read at forward time in transformers 5
                vision.use_head = False
        if config.model_type in _UNREAD_FINAL_NORM:
            # The final norm only feeds last_hidden_state / the pooled output; we read the pre-norm hidden state.
            for norm in ("post_layernorm", "layernorm"):
                if isinstance(getattr(vision, norm, None), nn.LayerNorm):
                    setattr(vision, norm, nn.Identity())
        self.model = model

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self._blocks_path)

    def enable_gradient_checkpointing(self) -> None:
        """``transformers``' checkpointing, non-reentrant (inputs need not require grad: a partly trained tower's
        first trained block gets its input from frozen blocks). ``transformers`` checkpoints a block in train mode,
        which in this project means a block that trains."""
        kwargs = {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def forward(self, pixel_values: Tensor) -> Tensor:
        self.check_input(pixel_values)
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        return self.select(out.hidden_states[-1])  # [B, N, D]


class TinyCLIPVision(HFVisionTower):
    """A ``CLIPVisionModel`` small enough for CPU runs and tests: randomly initialised, or with the weights of a
    tower pretrained in this project (``weights``: e.g. a :class:`~lit_mllm.lit.clip_pretraining.CLIPPretraining`
    checkpoint; build it with that run's sizes).

    Its ``image_size`` is the resolution it is built at: the weights given must have been trained at it.
    """

    def __init__(
        self,
        image_size: int = 64,
        patch_size: int = 8,
        hidden_size: int = 64,
        num_layers: int = 3,
        num_heads: int = 4,
        feature_layer: int = -2,
        keep_cls: bool = False,
        gradient_checkpointing: bool = False,
        weights: str | None = None,
        weights_prefix: str = "vision_tower.",
    ) -> None:
        """
        Args:
            image_size: Input side in pixels (the model is built at this size).
            patch_size: Patch side in pixels; (image_size / patch_size)^2 patch features per image.
            hidden_size: Feature width.
            num_layers: Transformer blocks before truncation at ``feature_layer``.
            num_heads: Attention heads.
            feature_layer: Hidden state to read, as in :class:`HFVisionTower`.
            keep_cls: Keep the CLS token.
            gradient_checkpointing: Recompute the blocks in the backward pass, as in :class:`HFVisionTower`.
            weights: A Lightning checkpoint (or ``.safetensors`` file) holding this tower's pretrained weights, e.g.
                a CLIP pretraining run's ``checkpoints/last.ckpt``; None = random initialisation. Every weight of the
                tower is set from it; blocks past ``feature_layer`` in it are skipped
                (:meth:`~lit_mllm.nn.vision.base.VisionTower.load_pretrained`).
            weights_prefix: Name prefix of the tower's tensors in ``weights`` (``vision_tower.`` in the checkpoints
                of CLIP pretraining and of every VLM; ``""`` for a file of the tower alone).
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
        if weights is not None:
            self.load_pretrained(
                tower_state(weights, weights_prefix), source=f"the {weights_prefix!r} tensors of {weights}"
            )
        if gradient_checkpointing:
            self.enable_gradient_checkpointing()
