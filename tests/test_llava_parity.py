"""Numerical parity with transformers' LlavaForConditionalGeneration: same weights, same batch, same logits
and loss (fp32). Our model is loaded through the real loading code from folders the reference saved."""

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from lit_mllm.data import collate, read_llava
from lit_mllm.data.images import normalize
from lit_mllm.lit import PrefixFusionVLM
from lit_mllm.lit.base import lm_loss
from lit_mllm.nn.connectors import MLPConnector
from lit_mllm.nn.language import LanguageModel, VicunaV1
from lit_mllm.nn.language.tokenizer import TINY_TOKENIZER_DIR
from lit_mllm.nn.vision import HFVisionTower
from tests.conftest import tiny_clip_vision_config


def test_logits_and_loss_match_transformers_llava(tmp_path, shapes_root):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=tiny_clip_vision_config(),
        text_config=LlamaConfig(
            vocab_size=len(tok),
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    ref = LlavaForConditionalGeneration(config).eval()
    # random projector/LM init is tiny; scale up so a mismatch could not hide under the tolerance
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(3.0)

    ref.model.vision_tower.save_pretrained(tmp_path / "vision")
    lm = LlamaForCausalLM(config.text_config)
    lm.model.load_state_dict(ref.model.language_model.state_dict())
    lm.lm_head.load_state_dict(ref.lm_head.state_dict())
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")

    ours = PrefixFusionVLM(
        HFVisionTower(str(tmp_path / "vision"), feature_layer=-2, keep_cls=False),
        LanguageModel(str(tmp_path / "lm"), chat_format=VicunaV1(), attn_implementation="eager"),
        connector=MLPConnector,
    ).eval()
    ours.connector.load_state_dict(ref.model.multi_modal_projector.state_dict())
    ref.config.text_config._attn_implementation = "eager"
    ref.model.language_model.config._attn_implementation = "eager"

    proc = ours.processor()
    samples = read_llava(shapes_root / "train.json")[:3]
    items = [proc(s) for s in samples]
    batch = collate(items, pad_token_id=tok.pad_token_id)

    with torch.no_grad():
        expected = ref(
            input_ids=batch.input_ids,
            pixel_values=normalize(batch.pixel_values, ours.vision_tower.mean, ours.vision_tower.std),
            attention_mask=batch.attention_mask,
            labels=batch.labels,
        )
        logits = ours(batch)
    mask = batch.attention_mask.bool()
    assert logits.abs().max() > 1.0
    torch.testing.assert_close(logits[mask], expected.logits[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lm_loss(logits, batch.labels), expected.loss, rtol=1e-6, atol=1e-6)
