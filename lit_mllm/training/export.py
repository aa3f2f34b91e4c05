"""Exporting a trained model (``lit-mllm export``, :mod:`lit_mllm.commands.export`).

Our checkpoints hold only the weights a stage trains (+ optimizer state); frozen weights are rebuilt from the
config's sources. So a trained model is: build from the config, then
:func:`~lit_mllm.training.checkpoints.load_weights` (a non-strict load in which every tensor of the file must land
on a parameter or buffer of the model).

Two export formats:

- ``llava``: a ``transformers`` ``LlavaForConditionalGeneration`` folder (safetensors weights, config, tokenizer,
  image processor, processor) that ``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor`` load
  without this package. Only what LLaVA can express exactly is accepted: a prefix-fusion model with a Hugging Face
  CLIP or SigLIP tower, a 2-layer GELU :class:`~lit_mllm.nn.connectors.MLPConnector` whose hidden width is the
  LLM width (LLaVA-1.5), any causal LM ``transformers`` can put in a LLaVA (Llama, Qwen2, ...), and a one-crop
  image layout (``Resize``, ``ResizeCrop``, ``Letterbox`` with the tower's mean as fill). The folder's chat
  template renders :class:`~lit_mllm.nn.language.VicunaV1` (or keeps the tokenizer's own for
  ``TokenizerTemplate``). With transformers 5 the processor gives our exact pixels when loaded with the backend
  of the layout's resampler: the default (torchvision) for ``resampler="torch"``, ``backend="pil"`` for ``"pil"``.
- ``safetensors``: any family: ``model.safetensors`` (every weight) and the resolved ``config.yaml`` with
  ``model.init_args.init_from`` pointing at it, for ``lit-mllm predict --config DIR/config.yaml``.

LoRA: both formats write plain weights, so a model holding LoRA adapters (a stage's ``lora``) is exported with the
adapters merged into its base weights (:func:`with_adapters_merged`; QLoRA's 4-bit weights are dequantized). The
written safetensors config drops the stage's ``lora`` accordingly.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lit_mllm.lit.prefix import PrefixFusionVLM
from lit_mllm.nn.connectors import LinearConnector, MLPConnector
from lit_mllm.nn.language.chat import ChatFormat, TokenizerTemplate, VicunaV1
from lit_mllm.nn.language.model import LanguageModel
from lit_mllm.nn.vision.hf import HFVisionTower

FORMATS = ("llava", "safetensors")
LLAVA_TOWER_TYPES = {"clip_vision_model": "CLIP", "siglip_vision_model": "SigLIP"}


class UnsupportedExport(ValueError):
    """The model has a part the requested export format cannot express."""


def with_adapters_merged(model: nn.Module) -> nn.Module:
    """``model`` with its LoRA adapters merged into the base weights, as an export writes it: ``model`` itself when
    it holds none, else a merged copy (the caller's model keeps its adapters; the copy costs the memory of the
    model's weights; ``lit-mllm export`` merges its own model in place instead)."""
    from lit_mllm.training.peft import has_adapters, merge_adapters

    if not has_adapters(model):
        return model
    merged = copy.deepcopy(model)
    count = merge_adapters(merged)
    rank_zero_info(f"merged the LoRA adapters of {count} layers into their base weights for export")
    return merged


def drop_adapters_from_config(model_node: dict) -> None:
    """Remove the stage's ``lora`` (and each scheduled stage's) from a resolved ``model`` config node, in place: the
    exported weights hold the adapters merged, so the model they load into must have none."""

    def body(node):  # a stage or schedule node, given directly or as {class_path, init_args}
        return node.get("init_args", node) if isinstance(node, dict) else {}

    stage = body(model_node.get("init_args", {}).get("stage"))
    for node in [stage, *(body(m.get("stage")) for m in stage.get("stages", []))]:
        if node.get("lora"):
            node["lora"] = {}


# -- LLaVA (transformers) ---------------------------------------------------------------------------------------
def _llava_parts(llava: nn.Module) -> dict[str, nn.Module]:
    """The four parts of a ``LlavaForConditionalGeneration``; ``transformers`` >= 4.52 nests them under ``.model``
    (with a bare decoder and the head outside), older versions keep a whole causal LM as ``language_model``."""
    if hasattr(llava, "lm_head"):
        core = llava.model
        return {
            "vision_tower": core.vision_tower,
            "multi_modal_projector": core.multi_modal_projector,
            "decoder": core.language_model,
            "lm_head": llava.lm_head,
        }
    return {
        "vision_tower": llava.vision_tower,
        "multi_modal_projector": llava.multi_modal_projector,
        "decoder": llava.language_model.base_model,
        "lm_head": llava.language_model.get_output_embeddings(),
    }


def llava_feature_strategy(tower: HFVisionTower) -> str:
    """LLaVA's ``vision_feature_select_strategy`` that gives our tower's tokens: ``default`` drops exactly one
    prefix token (CLS), ``full`` keeps every token."""
    if tower.keep_cls or tower.num_prefix_tokens == 0:
        return "full"
    if tower.num_prefix_tokens == 1:
        return "default"
    raise UnsupportedExport(
        f"the tower drops {tower.num_prefix_tokens} prefix tokens (CLS + registers), but LLaVA can drop only one "
        "(vision_feature_select_strategy='default'); use --format safetensors"
    )


def check_llava_exportable(model: nn.Module) -> None:
    """Raise :class:`UnsupportedExport` naming what LLaVA supports unless ``model`` can be written as a
    ``LlavaForConditionalGeneration`` exactly."""
    supported = (
        "LLaVA export supports a PrefixFusionVLM with a Hugging Face CLIP or SigLIP tower (HFVisionTower, "
        "TinyCLIPVision), an MLPConnector of depth 2 with hidden_dim = the LLM width (LLaVA-1.5's projector) and "
        "a transformers causal LM (LanguageModel); export any other model with --format safetensors"
    )
    if not isinstance(model, PrefixFusionVLM):
        raise UnsupportedExport(f"{type(model).__name__} is not a PrefixFusionVLM. {supported}")
    tower, connector, lm = model.vision_tower, model.connector, model.language_model
    model_type = getattr(getattr(getattr(tower, "model", None), "config", None), "model_type", None)
    if not isinstance(tower, HFVisionTower) or model_type not in LLAVA_TOWER_TYPES:
        what = type(tower).__name__ + (f" ({model_type})" if model_type else "")
        raise UnsupportedExport(f"vision tower {what} cannot be exported to LLaVA. {supported}")
    llava_feature_strategy(tower)
    if isinstance(connector, LinearConnector) or (
        isinstance(connector, MLPConnector) and connector.depth == 1
    ):
        raise UnsupportedExport(
            f"{type(connector).__name__} is a single linear layer, which LLaVA's projector (Linear-GELU-Linear) "
            f"cannot express. {supported}"
        )
    if not isinstance(connector, MLPConnector) or connector.depth != 2:
        what = type(connector).__name__ + (
            f"(depth={connector.depth})" if isinstance(connector, MLPConnector) else ""
        )
        raise UnsupportedExport(f"connector {what} cannot be exported to LLaVA. {supported}")
    if connector.linear_1.out_features != connector.out_dim:
        raise UnsupportedExport(
            f"MLPConnector hidden_dim={connector.linear_1.out_features} differs from the LLM width "
            f"{connector.out_dim}, but LLaVA's projector hidden width is the LLM width. {supported}"
        )
    if not isinstance(lm, LanguageModel):
        raise UnsupportedExport(
            f"language model {type(lm).__name__} cannot be exported to LLaVA. {supported}"
        )


def to_llava(model: PrefixFusionVLM):
    """A ``transformers`` ``LlavaForConditionalGeneration`` (eval mode, on CPU) computing what ``model`` computes.

    Mapping: the tower is written as it runs here, truncated after its feature layer, so LLaVA reads its last
    hidden state (``vision_feature_layer=-1``); CLS dropped or kept -> ``vision_feature_select_strategy``
    ``default`` / ``full``; the MLP connector -> ``multi_modal_projector.linear_1/2`` (same names); the LLM's
    config, decoder and head as they are (vocabulary including the added image token). The tower's final norm,
    which only feeds the pooled output neither model reads, is written as the identity. Needs memory for a second
    copy of the weights.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    check_llava_exportable(model)
    model = with_adapters_merged(model)
    tower, connector, lm = model.vision_tower, model.connector, model.language_model
    text_config = copy.deepcopy(lm.model.config)
    config = LlavaConfig(
        vision_config=copy.deepcopy(tower.model.config),
        text_config=text_config,
        image_token_index=lm.image_token_id,
        image_seq_length=model.tokens_per_image,
        projector_hidden_act="gelu",  # exact (erf) GELU, as nn.GELU()
        vision_feature_select_strategy=llava_feature_strategy(tower),
        vision_feature_layer=-1,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    # Built in the LLM's dtype (a 7B model would need twice the memory in fp32); each part then takes its source's.
    llava = LlavaForConditionalGeneration._from_config(
        config, dtype=lm.model.get_input_embeddings().weight.dtype
    )
    llava.eval()
    dst = _llava_parts(llava)
    sources = {
        "vision_tower": tower.model,
        "multi_modal_projector": connector,
        "decoder": lm.model.base_model,
        "lm_head": lm.model.get_output_embeddings(),
    }
    for name, src in sources.items():
        target = dst[name].to(device="cpu", dtype=next(src.parameters()).dtype)
        result = target.load_state_dict(src.state_dict(), strict=False)
        # Only the tower's final norm may be missing: we replaced it by nn.Identity (see to_llava's docstring).
        missing = [k for k in result.missing_keys if not (name == "vision_tower" and "post_layernorm" in k)]
        if missing or result.unexpected_keys:
            raise UnsupportedExport(
                f"the {name} of the LLaVA model does not match ours: missing {missing[:3]}, unexpected "
                f"{result.unexpected_keys[:3]}; this transformers version lays LLaVA out differently"
            )
    vision = getattr(dst["vision_tower"], "vision_model", dst["vision_tower"])
    if isinstance(getattr(vision, "post_layernorm", None), nn.LayerNorm):
        vision.post_layernorm.reset_parameters()  # weight 1, bias 0; unread (see docstring)
    if config.tie_word_embeddings:
        llava.tie_weights()
    return llava


_VICUNA_TEMPLATE = """
{%- macro text(content) -%}
  {%- if content is string -%}{{- content -}}
  {%- else -%}
    {%- for c in content -%}
      {%- if c['type'] == 'image' -%}{{- image + '\n' -}}
      {%- elif c['type'] == 'text' -%}{{- c['text'] -}}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- if add_bos and bos_token -%}{{- bos_token -}}{%- endif -%}
{%- if messages[0]['role'] == 'system' -%}
  {{- text(messages[0]['content']) -}}{%- set turns = messages[1:] -%}
{%- else -%}
  {{- system -}}{%- set turns = messages -%}
{%- endif -%}
{{- ' ' -}}
{%- for m in turns -%}
  {%- if m['role'] == 'user' -%}{{- user + ': ' + text(m['content']) + ' ' + assistant + ':' -}}
  {%- else -%}{{- ' ' + text(m['content']) + eos_token -}}
  {%- endif -%}
{%- endfor -%}
"""


def vicuna_chat_template(chat_format: VicunaV1, image_token: str, bos: bool = True) -> str:
    """A Jinja ``chat_template`` rendering like :class:`VicunaV1`. List contents (``{"type": "image"}`` /
    ``{"type": "text", ...}`` items) are rendered in their order, each image as ``image_token`` + newline and each
    text as it is: ``[image, text]`` gives LLaVA-1.5's ``<image>\\n`` + question, and ``[image, text, image, text]``
    keeps each image before its text, as a training record ``<image>\\nA<image>\\nB`` has it (a template that
    moved every image to the front would give other ids than training). ``bos=False`` leaves the BOS token to a
    tokenizer that adds it itself."""
    values = {
        "system": chat_format.system,
        "user": chat_format.user,
        "assistant": chat_format.assistant,
        "image": image_token,
        "add_bos": bos,
    }
    # json.dumps gives valid Jinja literals: quotes and control characters escaped, true/false as Jinja reads them
    header = "".join(f"{{%- set {k} = {json.dumps(v, ensure_ascii=False)} -%}}" for k, v in values.items())
    return header + _VICUNA_TEMPLATE.strip()


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of a text by itself (``add_special_tokens=True``)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def chat_template_for(chat_format: ChatFormat, tokenizer, image_token: str) -> str | None:
    """The Jinja template that renders conversations as ``chat_format`` does (for the exported processor, which
    tokenizes with ``add_special_tokens=True``), or None when there is none."""
    if isinstance(chat_format, VicunaV1):
        return vicuna_chat_template(chat_format, image_token, bos=not _adds_bos(tokenizer))
    if isinstance(chat_format, TokenizerTemplate):
        return tokenizer.chat_template
    return None


def llava_image_processor(model: PrefixFusionVLM):
    """A ``transformers`` ``LlavaImageProcessor`` preparing images as our processor does: ``Resize`` (bicubic to
    the tower's square, no crop), ``ResizeCrop`` (shorter side, centre crop) or ``Letterbox`` with the tower's mean
    as fill (pad to a square, LLaVA-1.5's "pad" mode), then the tower's mean/std. Tiling layouts have no LLaVA
    equivalent and are refused.

    Under transformers 5 the processor is the backend that resamples as the layout's ``resampler`` does, so
    ``AutoProcessor.from_pretrained(out)`` gives our pixels exactly for ``"torch"`` (the default torchvision
    backend) and ``AutoProcessor.from_pretrained(out, backend="pil")`` for ``"pil"``; the other backend differs
    by about a level in a few percent of the pixels of resized images."""
    from PIL import Image

    from lit_mllm.data.layouts import Letterbox, Resize, ResizeCrop

    tower = model.vision_tower
    layout = getattr(model, "image_layout", None) or Resize()
    try:  # transformers 5: one processor class per backend
        from transformers import LlavaImageProcessor, LlavaImageProcessorPil

        ImageProcessor = LlavaImageProcessorPil if layout.resampler == "pil" else LlavaImageProcessor
    except ImportError:  # transformers 4: the default processor is the PIL one
        from transformers import LlavaImageProcessor as ImageProcessor
    square = {"height": tower.image_size, "width": tower.image_size}
    mean_fill = tuple(int(x * 255) for x in tower.mean)  # what LlavaImageProcessor pads with
    if type(layout) is Resize:
        geometry = dict(size=square, do_center_crop=False, do_pad=False)
    elif type(layout) is ResizeCrop:
        geometry = dict(size={"shortest_edge": tower.image_size}, do_center_crop=True, do_pad=False)
    elif type(layout) is Letterbox and tuple(layout.fill) == mean_fill:
        geometry = dict(size=square, do_center_crop=False, do_pad=True)
    else:
        hint = f" (LLaVA pads with the tower's mean, {mean_fill})" if isinstance(layout, Letterbox) else ""
        raise UnsupportedExport(
            f"image layout {layout!r}{hint} has no LLaVA image processor equivalent; LLaVA export supports Resize, "
            "ResizeCrop and Letterbox with the tower's mean as fill. Use --format safetensors"
        )
    return ImageProcessor(
        do_resize=True,
        resample=Image.Resampling.BICUBIC,
        crop_size=square,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(tower.mean),
        image_std=list(tower.std),
        do_convert_rgb=True,
        **geometry,
    )


def llava_processor(model: PrefixFusionVLM):
    """A ``transformers`` ``LlavaProcessor`` doing what our processor does: the tokenizer (with the image token at
    the same id), images as :func:`llava_image_processor` prepares them, each ``<image>`` expanded to
    ``tokens_per_image`` tokens, and a chat template rendering our chat format (see :func:`chat_template_for`)."""
    from transformers import LlavaProcessor

    tower, lm = model.vision_tower, model.language_model
    images = llava_image_processor(model)
    tokenizer = copy.deepcopy(lm.tokenizer)
    template = chat_template_for(lm.chat_format, lm.tokenizer, lm.image_token)
    if template is None:
        rank_zero_info(
            f"no chat template is written for {type(lm.chat_format).__name__}; render prompts as it does"
        )
    tokenizer.chat_template = template
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=tower.patch_size,
        vision_feature_select_strategy=llava_feature_strategy(tower),
        chat_template=template,
        image_token=lm.image_token,
        num_additional_image_tokens=tower.num_prefix_tokens,
    )
    if processor.image_token != lm.image_token:
        raise UnsupportedExport(
            f"the tokenizer names {processor.image_token!r} as its image token but the model uses "
            f"{lm.image_token!r}; set language_model.image_token to {processor.image_token!r}"
        )
    return processor


def export_llava(model: PrefixFusionVLM, out: str | Path) -> Path:
    """Write ``model`` as a ``transformers`` LLaVA folder (see :func:`to_llava` and :func:`llava_processor`):
    ``LlavaForConditionalGeneration.from_pretrained(out)`` and ``AutoProcessor.from_pretrained(out)`` load it."""
    out = Path(out)
    check_llava_exportable(model)
    processor = llava_processor(
        model
    )  # refuses image layouts LLaVA cannot express before the weights are copied
    llava = to_llava(model)
    out.mkdir(parents=True, exist_ok=True)
    llava.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    rank_zero_info(f"wrote a LLaVA (transformers) folder to {out}")
    return out


# -- plain safetensors + config ---------------------------------------------------------------------------------
def export_safetensors(model: nn.Module, config: str | dict[str, Any], out: str | Path) -> Path:
    """Write every weight of ``model`` to ``out/model.safetensors`` and the resolved config (YAML text or mapping,
    as LightningCLI's ``config.yaml``) to ``out/config.yaml`` with ``model.init_args.init_from`` set to the
    weights, so ``lit-mllm predict --config out/config.yaml`` starts from them. Tied weights are stored once."""
    from safetensors.torch import save_model

    merged = with_adapters_merged(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = (out / "model.safetensors").resolve()
    save_model(merged, str(weights), metadata={"format": "pt", "model": type(model).__name__})
    resolved = yaml.safe_load(config) if isinstance(config, str) else copy.deepcopy(dict(config))
    model_node = resolved.get("model")
    if not isinstance(model_node, dict) or "class_path" not in model_node:
        raise ValueError(
            "the config has no `model: {class_path: ..., init_args: ...}` section; pass the resolved config of "
            "a lit-mllm run (its config.yaml)"
        )
    model_node.setdefault("init_args", {})["init_from"] = str(weights)
    if merged is not model:
        drop_adapters_from_config(model_node)
    (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    rank_zero_info(f"wrote {weights} and {out / 'config.yaml'}")
    return out
