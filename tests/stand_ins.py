"""Tiny stand-ins for hub checkpoints, for the tests of shipped configs: the same architecture families saved
like hub checkpoints in a temp dir, and a rewrite of a config that points every hub name at them (at any depth:
fused towers hold a list of towers). Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

# Hub name in a real preset -> the tiny local checkpoint standing in for it (see :func:`build_tiny_hub`).
HF_STAND_INS = {
    "openai/clip-vit-large-patch14": "clip224",
    "openai/clip-vit-large-patch14-336": "clip336",
    "lmsys/vicuna-13b-v1.3": "llama",
    "lmsys/vicuna-7b-v1.5": "llama",
    "Vision-CAIR/vicuna-7b": "llama",
    "meta-llama/Llama-2-7b-chat-hf": "llama",
    "facebook/opt-2.7b": "opt",
    "Qwen/Qwen-7B": "qwen2",
    "Qwen/Qwen1.5-7B": "qwen2",
    "Qwen/Qwen2-7B-Instruct": "qwen2_28",  # Qwen2-7B's 28 layers (mPLUG-Owl3 wraps layers 1, 9, 17, 25)
    "01-ai/Yi-1.5-9B-Chat": "llama",
    "meta-llama/Llama-2-7b-hf": "llama",
    "huggyllama/llama-7b": "llama",
    "facebook/dinov2-large": "dinov2",
    "google/siglip-so400m-patch14-384": "siglip",
    "bert-base-uncased": "bert_tokenizer",  # BLIP-2 stage 1's text tokenizer: the tiny WordPiece one
}
OPEN_CLIP_STAND_INS = {  # (model_name, pretrained) -> tiny open_clip folder, loaded as local-dir:
    ("ViT-bigG-14", "laion2b_s39b_b160k"): "openclip224",
    ("hf-hub:apple/DFN5B-CLIP-ViT-H-14-378", None): "openclip378",
    ("EVA01-g-14", "laion400m_s11b_b41k"): "openclip_eva224",
    ("EVA02-E-14", "laion2b_s4b_b115k"): "openclip_eva224",  # timm Eva trunk too (EVA02-E's adds post-norm)
}
TINY_EVA = "lit_mllm_test_eva_patch14_224"  # a timm Eva trunk (EVA-CLIP-g's class), 3 blocks of width 32


def with_stand_ins(path: Path, hub: Path, out: Path) -> Path:
    """A copy of a real preset with every hub name, at any depth (fused towers hold a list of towers), pointed at
    a tiny local checkpoint."""

    def swap(node):
        if isinstance(node, list):
            return [swap(n) for n in node]
        if not isinstance(node, dict):
            return node
        node = {k: swap(v) for k, v in node.items()}
        if "model_name" in node:  # open_clip
            key = (node["model_name"], node.get("pretrained"))
            assert key in OPEN_CLIP_STAND_INS, f"{path.name}: add a tiny stand-in for open_clip {key}"
            node.update(model_name=f"local-dir:{hub / OPEN_CLIP_STAND_INS[key]}", pretrained=None)
        for field in ("name_or_path", "tokenizer"):
            if node.get(field) is not None:
                assert node[field] in HF_STAND_INS, f"{path.name}: add a tiny stand-in for {node[field]}"
                node[field] = str(hub / HF_STAND_INS[node[field]])
        return node

    local = out / f"{path.stem}_stand_ins.yaml"
    local.write_text(yaml.safe_dump(swap(yaml.safe_load(path.read_text()))))
    return local


def register_tiny_eva() -> None:
    """A tiny timm ``Eva`` (EVA-CLIP-g's trunk class: absolute positions, CLS token, no RoPE) open_clip can build."""
    import timm
    from timm.models import register_model
    from timm.models.eva import Eva

    if timm.is_model(TINY_EVA):
        return

    def tiny_eva(pretrained: bool = False, **kwargs) -> Eva:
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith(("pretrained_cfg", "cache_dir"))}
        arch = dict(img_size=224, patch_size=14, embed_dim=32, depth=3, num_heads=2, mlp_ratio=6144 / 1408)
        return Eva(**{**arch, **kwargs})

    tiny_eva.__name__ = TINY_EVA
    register_model(tiny_eva)


def save_open_clip(folder: Path, vision_cfg: dict, preprocess_cfg: dict | None = None):
    """Save a tiny open_clip CLIP with this vision config as a ``local-dir:`` folder; return the model (eval)."""
    import open_clip

    cfg = {
        "embed_dim": 16,
        "vision_cfg": vision_cfg,
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess_cfg or {}})
    )
    model = open_clip.model.CLIP(**cfg).eval()
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return model


def build_tiny_hub(root: Path) -> Path:
    """Tiny checkpoints saved like hub ones: HF CLIP towers (224/336 px, 14 px patches), open_clip towers (ViT at
    224 and 378 px, timm Eva at 224 px, 14 px patches) and Llama / OPT / Qwen2 causal LMs with the tiny tokenizer."""
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        CLIPVisionModel,
        Dinov2Config,
        Dinov2Model,
        LlamaConfig,
        LlamaForCausalLM,
        OPTConfig,
        OPTForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from lit_mllm.nn.language.tokenizer import TINY_BERT_TOKENIZER_DIR, TINY_TOKENIZER_DIR

    torch.manual_seed(0)
    vision = dict(
        patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    for size in (224, 336):
        CLIPVisionModel(CLIPVisionConfig(image_size=size, **vision)).save_pretrained(root / f"clip{size}")
    # DINOv2 (trained at 518 px) and SigLIP (384 px) stand-ins; the Prismatic preset resamples both to 378 px
    Dinov2Model(Dinov2Config(image_size=518, **vision)).save_pretrained(root / "dinov2")
    SiglipVisionModel(SiglipVisionConfig(image_size=384, **vision)).save_pretrained(root / "siglip")

    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    lm = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, **ids)
    llms = {
        "llama": LlamaForCausalLM(LlamaConfig(intermediate_size=64, num_key_value_heads=2, **lm)),
        "qwen2": Qwen2ForCausalLM(Qwen2Config(intermediate_size=64, num_key_value_heads=2, **lm)),
        "qwen2_28": Qwen2ForCausalLM(
            Qwen2Config(intermediate_size=64, num_key_value_heads=2, **{**lm, "num_hidden_layers": 28})
        ),
        "opt": OPTForCausalLM(OPTConfig(ffn_dim=64, word_embed_proj_dim=32, **lm)),
    }
    for name, model in llms.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)

    for size in (224, 378):
        vit = {"image_size": size, "layers": 2, "width": 32, "head_width": 16, "patch_size": 14}
        save_open_clip(root / f"openclip{size}", vit)
    register_tiny_eva()
    eva = {
        "image_size": 224,
        "timm_model_name": TINY_EVA,
        "timm_model_pretrained": False,
        "timm_pool": "token",
    }
    save_open_clip(root / "openclip_eva224", {**eva, "timm_proj": None})
    AutoTokenizer.from_pretrained(TINY_BERT_TOKENIZER_DIR).save_pretrained(root / "bert_tokenizer")
    return root
