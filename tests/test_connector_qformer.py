"""BLIP-2 Q-Former connector: contract, option checks, and parity with transformers' BLIP-2."""

import inspect

import pytest
import torch
from torch import nn

from lit_mllm.nn.connectors import qformer
from lit_mllm.nn.connectors.base import Connector
from lit_mllm.nn.connectors.qformer import QFormerConnector, blip2_key_to_connector

VISION, LLM, QF = 24, 40, 32  # vision width, LLM width, Q-Former width
TIGHT = {"rtol": 1.3e-6, "atol": 1e-5}  # torch's fp32 defaults; outputs are O(1..10)


def tiny(**kw) -> QFormerConnector:
    opts = dict(num_queries=5, num_layers=3, hidden_size=QF, num_heads=4, intermediate_size=64)
    return QFormerConnector(VISION, LLM, **(opts | kw))


@torch.no_grad()
def randomise(module: nn.Module, scale: float = 0.3) -> None:
    """Far from the 0.02 / zero-bias / unit-LayerNorm init, so a misplaced or missing weight shows."""
    for name, p in module.named_parameters():
        is_norm_weight = name.endswith("weight") and p.dim() == 1
        p.copy_(torch.randn_like(p) * scale + (1.0 if is_norm_weight else 0.0))


# ------------------------------------------------------------------------------------------------------------
# Contract
# ------------------------------------------------------------------------------------------------------------


def test_is_a_connector_with_documented_options():
    assert issubclass(QFormerConnector, Connector)
    doc = inspect.getdoc(QFormerConnector.__init__)
    for name in list(inspect.signature(QFormerConnector.__init__).parameters)[3:]:
        assert f"{name}: " in doc, f"{name} has no line in the Args: section (it becomes --help text)"


@pytest.mark.parametrize("n", [1, 7, 50])
def test_shapes_and_num_tokens(n):
    torch.manual_seed(0)
    conn = tiny()
    y = conn(torch.randn(3, n, VISION))
    assert conn.num_tokens(n) == 5
    assert y.shape == (3, conn.num_tokens(n), LLM)


def test_num_tokens_rejects_no_features():
    with pytest.raises(ValueError, match="N >= 1"):
        tiny().num_tokens(0)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    conn = tiny(cross_attention_frequency=2)
    x = torch.randn(2, 9, VISION, requires_grad=True)
    conn(x).square().sum().backward()
    for name, p in conn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0
    assert torch.equal(conn(x), conn(x))  # deterministic with dropout 0


def test_dropout_only_in_training():
    torch.manual_seed(0)
    conn = tiny(dropout=0.3)
    x = torch.randn(2, 9, VISION)
    assert not torch.equal(conn(x), conn(x))
    conn.eval()
    assert torch.equal(conn(x), conn(x))


@pytest.mark.parametrize(
    ("frequency", "cross"), [(1, [0, 1, 2, 3, 4, 5]), (2, [0, 2, 4]), (3, [0, 3]), (9, [0])]
)
def test_cross_attention_frequency(frequency, cross):
    conn = tiny(num_layers=6, cross_attention_frequency=frequency)
    assert [i for i, layer in enumerate(conn.layers) if layer.cross_attn is not None] == cross


def test_defaults_are_blip2():
    with torch.device("meta"):  # full size, no memory or init time
        conn = QFormerConnector(1408, 2560)
    assert conn.num_tokens(257) == 32 and len(conn.layers) == 12
    assert sum(layer.cross_attn is not None for layer in conn.layers) == 6
    assert conn.query_tokens.shape == (1, 32, 768) and conn.layers[0].ffn.fc1.out_features == 3072
    assert conn.vision_norm.normalized_shape == (1408,)


def test_without_vision_norm():
    conn = tiny(vision_norm=False)
    assert isinstance(conn.vision_norm, nn.Identity)
    assert conn(torch.randn(1, 4, VISION)).shape == (1, 5, LLM)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"num_heads": 5}, "hidden_size divisible by num_heads"),
        ({"num_queries": 0}, "num_queries >= 1"),
        ({"num_layers": 0}, "num_layers >= 1"),
        ({"cross_attention_frequency": 0}, "cross_attention_frequency >= 1"),
        ({"dropout": 1.0}, "0 <= dropout < 1"),
    ],
)
def test_bad_options(kw, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kw)


# ------------------------------------------------------------------------------------------------------------
# Parity with transformers
# ------------------------------------------------------------------------------------------------------------


def qformer_config(num_layers=4, frequency=2, **kw):
    from transformers import Blip2QFormerConfig

    return Blip2QFormerConfig(
        hidden_size=QF,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=64,
        encoder_hidden_size=VISION,
        cross_attention_frequency=frequency,
        **kw,
    )


@pytest.mark.parametrize(
    ("frequency", "text_input", "attn"),
    [(2, False, "eager"), (1, True, "sdpa"), (3, False, "sdpa")],
)
def test_matches_transformers_qformer(frequency, text_input, attn):
    """Ours vs ``language_projection(Blip2QFormerModel(query_tokens, ln_vision(features)))``, as in Blip2Model."""
    from transformers import Blip2QFormerModel

    torch.manual_seed(0)
    config = qformer_config(frequency=frequency, use_qformer_text_input=text_input, attn_implementation=attn)
    ref = Blip2QFormerModel(config).eval()
    ln_vision = nn.LayerNorm(VISION, eps=1e-6)  # lives in transformers' vision model as post_layernorm
    projection = nn.Linear(QF, LLM)  # Blip2Model.language_projection
    query_tokens = torch.randn(1, 6, QF)
    for module in (ref, ln_vision, projection):
        randomise(module)

    state_dict = {f"qformer.{k}": v for k, v in ref.state_dict().items()}
    state_dict |= {f"vision_model.post_layernorm.{k}": v for k, v in ln_vision.state_dict().items()}
    state_dict |= {f"language_projection.{k}": v for k, v in projection.state_dict().items()}
    state_dict["query_tokens"] = query_tokens
    ours = tiny(num_queries=6, num_layers=4, cross_attention_frequency=frequency).eval()
    assert ours.load_blip2_state_dict(state_dict) == []

    x = torch.randn(2, 11, VISION) * 2 + 0.5
    with torch.no_grad():
        image_embeds = ln_vision(x)
        out = ref(
            query_embeds=query_tokens.expand(2, -1, -1),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long),
        ).last_hidden_state
        expected = projection(out)
        got = ours(x)
    assert expected.abs().max() > 1  # not a near-zero output that any tolerance would accept
    torch.testing.assert_close(got, expected, **TIGHT)


def tiny_blip2(num_layers=3, frequency=2):
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

    config = Blip2Config(
        vision_config=dict(
            hidden_size=VISION,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        qformer_config=qformer_config(num_layers, frequency).to_dict(),
        text_config=OPTConfig(
            hidden_size=LLM,
            num_hidden_layers=1,
            num_attention_heads=2,
            ffn_dim=80,
            vocab_size=64,
            word_embed_proj_dim=LLM,
        ).to_dict(),
        num_query_tokens=4,
    )
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).eval()
    randomise(model.vision_model)
    randomise(model.qformer)
    randomise(model.language_projection)
    with torch.no_grad():
        model.query_tokens.normal_()
    return model


def test_from_blip2_matches_image_features():
    """End to end: ViT hidden states (before post_layernorm = ln_vision, as lit_mllm's HF towers give them)."""
    model = tiny_blip2()
    ours = QFormerConnector.from_blip2(model).eval()
    assert (ours.num_queries, len(ours.layers), ours.in_dim, ours.out_dim) == (4, 3, VISION, LLM)
    pixel_values = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = model.get_image_features(pixel_values, output_hidden_states=True)
        features = out.hidden_states[-1]  # [2, 1 + 4 patches, VISION], CLS included as in BLIP-2
        torch.testing.assert_close(model.vision_model.post_layernorm(features), out.last_hidden_state)
        got = ours(features)
    assert got.shape == out.pooler_output.shape == (2, 4, LLM)
    torch.testing.assert_close(got, out.pooler_output, **TIGHT)


def test_from_blip2_folder_reads_only_connector_shards(tmp_path, monkeypatch):
    model = tiny_blip2()
    model.save_pretrained(tmp_path, max_shard_size="20KB")  # several shards + index, as on the hub
    assert (tmp_path / "model.safetensors.index.json").exists()
    read = []
    load_tensors = qformer._load_tensors
    monkeypatch.setattr(qformer, "_load_tensors", lambda files: read.extend(files) or load_tensors(files))
    from_folder = QFormerConnector.from_blip2(tmp_path)
    assert 0 < len(read) < len(list(tmp_path.glob("*.safetensors")))  # LLM-only shards are skipped
    expected = QFormerConnector.from_blip2(model).state_dict()
    assert from_folder.state_dict().keys() == expected.keys()
    for k, v in from_folder.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_from_blip2_new_projection_for_another_llm():
    model = tiny_blip2()
    ours = QFormerConnector.from_blip2(model, out_dim=56, vision_norm=False)
    assert ours.proj.out_features == 56 and isinstance(ours.vision_norm, nn.Identity)
    assert torch.equal(ours.query_tokens, model.query_tokens)
    assert torch.equal(
        ours.layers[2].cross_attn.k_proj.weight,
        model.qformer.encoder.layer[2].crossattention.attention.key.weight,
    )


def lavis_name(key: str) -> str:
    """transformers' BLIP-2 conversion script run backwards (LAVIS / MiniGPT-4 checkpoint names)."""
    key = key.replace("qformer.layernorm.", "Qformer.bert.embeddings.LayerNorm.")
    key = key.replace("qformer.", "Qformer.bert.").replace("attention.attention.", "attention.self.")
    key = key.replace("vision_model.post_layernorm.", "ln_vision.")
    return key.replace("language_projection.", "llama_proj.")


def test_loads_lavis_and_minigpt4_names():
    model = tiny_blip2(num_layers=4)
    hf = {k: v for k, v in model.state_dict().items() if not k.startswith("language_model.")}
    lavis = {lavis_name(k): v for k, v in hf.items()}
    assert "Qformer.bert.encoder.layer.2.crossattention.self.key.weight" in lavis
    assert blip2_key_to_connector("Qformer.bert.encoder.layer.2.crossattention.self.key.weight") == (
        "layers.2.cross_attn.k_proj.weight"
    )
    a, b = tiny(num_queries=4, num_layers=4), tiny(num_queries=4, num_layers=4)
    a.load_blip2_state_dict(hf)
    b.load_blip2_state_dict(lavis)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_load_errors():
    model = tiny_blip2()
    bare = model.qformer.state_dict()  # a Blip2QFormerModel alone: no query tokens, projection, ln_vision
    conn = tiny(num_queries=4)
    with pytest.raises(ValueError, match="strict=False"):
        conn.load_blip2_state_dict(bare)
    assert sorted(conn.load_blip2_state_dict(bare, strict=False)) == [
        "proj.bias",
        "proj.weight",
        "query_tokens",
        "vision_norm.bias",
        "vision_norm.weight",
    ]
    assert torch.equal(conn.query_norm.weight, model.qformer.layernorm.weight)
    with pytest.raises(ValueError, match="cross_attention_frequency"):
        tiny(num_queries=4, cross_attention_frequency=1).load_blip2_state_dict(model.state_dict())
    with pytest.raises(RuntimeError, match="size mismatch"):
        tiny(num_queries=8).load_blip2_state_dict(model.state_dict())
