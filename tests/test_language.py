"""Language model wrapper and the offline tokenizer."""

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lit_mllm.nn.language import LanguageModel, TinyLlama, TinyQwen2, VicunaV1
from lit_mllm.nn.language.tokenizer import SPECIAL_TOKENS, TINY_TOKENIZER_DIR, build_tiny_tokenizer


def test_shipped_tokenizer_is_reproducible(tmp_path):
    build_tiny_tokenizer(tmp_path)
    shipped = json.loads((TINY_TOKENIZER_DIR / "tokenizer.json").read_text())
    rebuilt = json.loads((tmp_path / "tokenizer.json").read_text())
    assert rebuilt["model"]["vocab"] == shipped["model"]["vocab"]
    assert rebuilt["model"]["merges"] == shipped["model"]["merges"]


def test_tokenizer_round_trips_from_pretrained():
    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    text = "Is there a red circle? <image> Zebra Ünïcode 123!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte-level BPE loses nothing
    for t in SPECIAL_TOKENS:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    assert tok.chat_template


def _vicuna_like_tokenizer():
    """A byte-level BPE with <unk>, <s>, </s> only: no <image> and no pad token, like Vicuna's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        ["what color is the circle", "a red square"] * 10,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_from_pretrained_adds_image_token_and_pad(tmp_path):
    tok = _vicuna_like_tokenizer()
    assert tok.pad_token is None and "<image>" not in tok.get_vocab()
    n = len(tok)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=n,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    lm = LanguageModel(str(tmp_path), chat_format=VicunaV1())
    assert lm.image_token_id == n and len(lm.tokenizer) == n + 1
    assert lm.model.get_input_embeddings().num_embeddings == n + 1
    assert lm.tokenizer.pad_token == "<unk>"
    assert torch.equal(lm.model.get_input_embeddings().weight[:n], model.get_input_embeddings().weight)
    # the placeholder is one token wherever it stands in the text
    ids = lm.tokenizer("a<image>red <image>", add_special_tokens=False)["input_ids"]
    assert ids.count(lm.image_token_id) == 2


def test_tiny_presets_share_the_interface():
    for lm in (TinyLlama(hidden_size=32, num_layers=1), TinyQwen2(hidden_size=32, num_layers=1)):
        ids = torch.tensor([[1, 5, 9]])
        logits = lm(lm.embed(ids))
        assert logits.shape == (1, 3, lm.model.config.vocab_size)
        assert lm.hidden_size == 32 and lm.image_token_id == lm.tokenizer.convert_tokens_to_ids("<image>")


def test_tiny_lm_vocab_size_pads_the_tables_and_refuses_too_small():
    lm = TinyLlama(hidden_size=32, num_layers=1, vocab_size=1000)
    assert lm.model.get_input_embeddings().num_embeddings == 1000
    assert lm.model.get_output_embeddings().weight.shape[0] == 1000
    assert lm.image_token_id < len(lm.tokenizer) < 1000
    with pytest.raises(ValueError, match="below the tiny tokenizer's"):
        TinyLlama(hidden_size=32, num_layers=1, vocab_size=10)
