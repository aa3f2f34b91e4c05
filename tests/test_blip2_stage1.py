"""BLIP-2 stage 1 (Q-Former pretraining): the three masks, ITC similarities and ITM logits against transformers'
Blip2ForImageTextRetrieval with copied weights, hard negatives, the caption processor, learning on a few samples,
and a stage-1 checkpoint starting the prefix family's Q-Former connector (stage 2)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch import nn

from lit_mllm.commands.lightning import build_cli
from lit_mllm.data import Conversations, DataError, MixtureData, Sample
from lit_mllm.lit import QFormerPretraining
from lit_mllm.nn.connectors import QFormerConnector
from lit_mllm.nn.fusion.qformer_pretraining import (
    QFormer,
    blip2_stage1_key,
    itc_similarity,
    objective_mask,
    sample_hard_negatives,
)
from lit_mllm.nn.language.chat import IGNORE_INDEX, Turn
from lit_mllm.nn.vision import TinyCLIPVision
from lit_mllm.training.checkpoints import AtomicCheckpointIO, read_checkpoint
from lit_mllm.training.stages import Milestone, Stage, StageSchedule
from tests.conftest import Record, cli_args, tiny_fit

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VISION, QF, EMBED, POSITIONS = 24, 32, 16, 40
TIGHT = {"rtol": 1.3e-6, "atol": 1e-5}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(vision_dim=32, frequency=2, image_size=32, **kw) -> QFormerPretraining:
    torch.manual_seed(0)
    tower = TinyCLIPVision(
        image_size=image_size,
        patch_size=8,
        hidden_size=vision_dim,
        num_layers=1,
        num_heads=2,
        feature_layer=-1,
        keep_cls=True,
    )
    qformer = functools.partial(
        QFormer,
        num_queries=4,
        num_layers=3,
        hidden_size=QF,
        num_heads=4,
        intermediate_size=64,
        cross_attention_frequency=frequency,
        max_positions=POSITIONS,
    )
    return QFormerPretraining(tower, qformer, max_text_length=POSITIONS, embed_dim=EMBED, **kw)


@torch.no_grad()
def randomise(module: nn.Module, scale: float = 0.3) -> None:
    """Far from the 0.02 / zero-bias / unit-LayerNorm init, so a misplaced or missing weight shows."""
    for name, p in module.named_parameters():
        is_norm_weight = name.endswith("weight") and p.dim() == 1
        p.copy_(torch.randn_like(p) * scale + (1.0 if is_norm_weight else 0.0))


# -- the masks --------------------------------------------------------------------------------------------------


def expected_visibility(objective: str, q: int, lengths: list[int], length: int) -> torch.Tensor:
    """The paper's description, position by position."""
    out = torch.zeros(len(lengths), q + length, q + length, dtype=torch.bool)
    for b, n in enumerate(lengths):
        for i in range(q + length):
            for j in range(q + length):
                if j >= q + n:  # padding is never seen
                    continue
                row_query, col_query = i < q, j < q
                if objective == "itm":
                    seen = True
                elif objective == "itc":
                    seen = row_query == col_query
                else:  # itg: queries see queries; text sees all queries and earlier text (itself included)
                    seen = col_query if row_query else (col_query or j <= i)
                out[b, i, j] = seen
    return out


@pytest.mark.parametrize("objective", ["itc", "itm", "itg"])
def test_masks_have_the_papers_visibility(objective):
    lengths = [5, 3, 1]
    text_mask = torch.tensor([[1] * n + [0] * (5 - n) for n in lengths])
    got = objective_mask(objective, 3, text_mask)
    assert got.dtype == torch.bool and got.shape == (3, 8, 8)
    assert torch.equal(got, expected_visibility(objective, 3, lengths, 5))


def test_mask_spot_checks_and_errors():
    m = objective_mask("itg", 2, torch.ones(1, 3))[0]  # positions: q0 q1 t0 t1 t2
    assert m[0].tolist() == [True, True, False, False, False]  # a query never sees text
    assert m[3].tolist() == [True, True, True, True, False]  # t1 sees the queries, t0 and itself
    assert objective_mask("itc", 2, torch.ones(1, 3))[0, 2].tolist() == [False, False, True, True, True]
    with pytest.raises(ValueError, match="objective must be one of"):
        objective_mask("mlm", 2, torch.ones(1, 3))


# -- pieces ---------------------------------------------------------------------------------------------------


def test_itc_similarity_is_the_max_over_queries():
    torch.manual_seed(0)
    img, txt = torch.randn(3, 5, 8), torch.randn(4, 8)
    expected = torch.tensor(
        [[max(float(img[i, q] @ txt[j]) for q in range(5)) for j in range(4)] for i in range(3)]
    )
    torch.testing.assert_close(itc_similarity(img, txt), expected)


def test_hard_negatives_never_draw_a_positive_and_follow_the_softmax():
    logits = torch.tensor(
        [[5.0, 1.0, 0.0, 2.0], [0.0, 5.0, 3.0, 3.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
    )
    same = torch.zeros(4, 4, dtype=torch.bool)
    same[0, 3] = same[3, 0] = True  # texts 0 and 3 are the same caption
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_hard_negatives(logits, same, generator) for _ in range(4000)])  # [4000, 4]
    counts = torch.stack([torch.bincount(draws[:, r], minlength=4) for r in range(4)]).float() / 4000
    assert counts[0, 0] == counts[0, 3] == 0 and counts[1, 1] == 0 and counts[3, 3] == counts[3, 0] == 0
    expected_row1 = torch.tensor([0.0, 3.0, 3.0]).softmax(0)  # columns 0, 2, 3
    torch.testing.assert_close(counts[1, [0, 2, 3]], expected_row1, atol=0.03, rtol=0)
    torch.testing.assert_close(counts[0, [1, 2]], torch.tensor([1.0, 0.0]).softmax(0), atol=0.03, rtol=0)


def test_hard_negatives_when_every_other_caption_is_the_same():
    same = torch.ones(3, 3, dtype=torch.bool)
    neg = sample_hard_negatives(torch.zeros(3, 3), same, torch.Generator().manual_seed(0))
    assert (neg != torch.arange(3)).all()  # still another pair
    with pytest.raises(ValueError, match="at least two pairs"):
        sample_hard_negatives(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool))


def test_query_branch_names_are_the_connectors_and_give_its_outputs():
    """A stage-1 Q-Former's query branch is a QFormerConnector (minus the LLM projection): the same names, and
    under the ITC mask its query outputs are the connector's before ``proj``."""
    torch.manual_seed(0)
    qformer = QFormer(
        VISION, 50, num_queries=4, num_layers=3, hidden_size=QF, num_heads=4, intermediate_size=64
    )
    randomise(qformer)
    connector = QFormerConnector(
        VISION, 40, num_queries=4, num_layers=3, hidden_size=QF, num_heads=4, intermediate_size=64
    )
    theirs = qformer.state_dict()
    ours = [k for k in connector.state_dict() if not k.startswith("proj.")]
    assert set(ours) <= set(theirs)
    assert set(theirs) - set(ours) == {
        "word_embeddings.weight",
        "position_embeddings.weight",
        *(k for k in theirs if ".text_ffn." in k),
    }
    connector.load_state_dict({k: theirs[k] for k in ours}, strict=False)
    connector.eval(), qformer.eval()
    features, ids = torch.randn(2, 7, VISION), torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        hidden = qformer(features, ids, objective_mask("itc", 4, torch.ones(2, 5)))
        torch.testing.assert_close(connector(features), connector.proj(hidden[:, :4]), **TIGHT)


# -- parity with transformers ----------------------------------------------------------------------------------


def retrieval_model(vocab_size: int, frequency: int, attn: str):
    from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2QFormerConfig, OPTConfig

    qformer = Blip2QFormerConfig(
        hidden_size=QF,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        cross_attention_frequency=frequency,
        vocab_size=vocab_size,
        max_position_embeddings=POSITIONS,
        use_qformer_text_input=True,
    )
    config = Blip2Config(
        vision_config=dict(
            hidden_size=VISION,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        qformer_config=qformer.to_dict(),
        text_config=OPTConfig(
            hidden_size=40, num_hidden_layers=1, num_attention_heads=2, ffn_dim=80, vocab_size=64
        ).to_dict(),
        num_query_tokens=4,
        image_text_hidden_size=EMBED,
    )
    config._attn_implementation = attn
    config.qformer_config._attn_implementation = attn
    torch.manual_seed(0)
    model = Blip2ForImageTextRetrieval(config).eval()
    randomise(model)
    return model


@pytest.mark.parametrize(("frequency", "attn"), [(2, "eager"), (1, "sdpa")])
def test_itc_and_itm_match_transformers_blip2_retrieval(frequency, attn):
    """Ours vs ``Blip2ForImageTextRetrieval(use_image_text_matching_head=False / True)``: the ITC similarity of
    every image with every text, and the ITM logits of each (image, text) pair. Our features are the ViT's hidden
    states before its post_layernorm, which is BLIP-2's ln_vision (our ``qformer.vision_norm``)."""
    ours = tiny(vision_dim=VISION, frequency=frequency, image_size=16).eval()
    ref = retrieval_model(len(ours.tokenizer), frequency, attn)
    mapped = {blip2_stage1_key(k): v for k, v in ref.state_dict().items() if blip2_stage1_key(k) is not None}
    expected_names = {k for k in ours.state_dict() if k.startswith(("qformer.", "heads."))}
    stage1_only = {"heads.log_temperature", "heads.lm_bias"} | {
        k for k in expected_names if ".lm_transform." in k
    }
    assert (
        set(mapped) == expected_names - stage1_only
    )  # every Q-Former and head weight comes from transformers'
    ours.load_state_dict(mapped, strict=False)

    torch.manual_seed(1)
    pixel_values = torch.randn(3, 3, 16, 16)
    input_ids = torch.randint(6, len(ours.tokenizer), (3, 7))
    input_ids[:, 0] = ours.tokenizer.cls_token_id
    attention_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 6 + [0]])
    with torch.no_grad():
        itc = ref(
            pixel_values, input_ids, attention_mask, use_image_text_matching_head=False
        ).logits_per_image
        itm = ref(pixel_values, input_ids, attention_mask, use_image_text_matching_head=True).logits_per_image
        features = ref.vision_model(pixel_values, output_hidden_states=True).hidden_states[
            -1
        ]  # [3, 5, VISION]
        got_itc = ours.itc(features, input_ids, attention_mask.bool())
        got_itm = ours.itm_logits(features, input_ids, attention_mask.bool())
    assert itc.shape == (3, 3) and itm.shape == (3, 2)
    assert itm.abs().max() > 0.5 and itc.std() > 0.01  # not a near-constant output any tolerance would accept
    torch.testing.assert_close(got_itc, itc, **TIGHT)
    torch.testing.assert_close(got_itm, itm, **TIGHT)


# -- the module ----------------------------------------------------------------------------------------------------


def caption_sample(text: str) -> Sample:
    return Sample("s0", [Turn("user", "<image>\nDescribe."), Turn("assistant", text)], ["x.png"], "test")


def test_processor_gives_cls_caption_sep_and_truncates_keeping_sep():
    model = tiny()
    proc = model.processor()
    tok = model.tokenizer
    ids, labels = (
        t.tolist() for t in proc.encode_text(caption_sample("A small red circle at the top left."))
    )
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.decode(ids[1:-1]) == "a small red circle at the top left."
    assert labels == [IGNORE_INDEX] + ids[1:]  # everything after [CLS] is predicted, [SEP] included
    proc.max_caption_tokens = 5
    short = proc.encode_text(caption_sample("A small red circle at the top left."))[0].tolist()
    assert short == ids[:4] + [tok.sep_token_id]
    two = Sample("s1", [Turn("user", "<image><image>"), Turn("assistant", "x")], ["a.png", "b.png"], "test")
    with pytest.raises(DataError, match="one image with one caption"):
        proc.encode_text(two)


def caption_data(root, batch_size=4, **kw) -> MixtureData:
    splits = {s: {"shapesworld": Conversations(f"captions_{s}.json")} for s in ("train", "val")}
    return MixtureData(str(root), **splits, batch_size=batch_size, num_workers=0, **kw)


def first_batch(model, root, batch_size=4):
    data = caption_data(root, batch_size)
    data.connect(model.processor())
    data.setup("fit")
    return next(iter(data.train_dataloader()))[0]


def test_itg_is_causal_and_grounded(shapes_root):
    model = tiny().eval()
    batch = first_batch(model, shapes_root, 2)
    features = model.encode_images(batch.pixel_values)
    ids, mask = batch.input_ids, batch.attention_mask.bool()
    with torch.no_grad():
        logits = model.itg_logits(features, ids, mask)
        changed = ids.clone()
        changed[:, 4] = model.tokenizer.mask_token_id
        later = model.itg_logits(features, changed, mask)
        other_image = model.itg_logits(features.flip(0), ids, mask)
    torch.testing.assert_close(later[:, :4], logits[:, :4])  # a token never sees a later one
    assert not torch.allclose(later[:, 4], logits[:, 4])
    assert not torch.allclose(
        other_image[:, :1], logits[:, :1]
    )  # [DEC] already reads the image through the queries


def test_stage_freezes_the_tower_and_steps_learn(shapes_root):
    model = tiny()
    assert model.stage.trainable == ["qformer", "heads"]
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    batch = first_batch(model, shapes_root, 4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    assert not model.vision_tower.training
    history = []
    for step in range(25):
        optimizer.zero_grad()
        losses, _ = model.losses(batch)
        sum(losses.values()).backward()
        if step == 0:
            assert set(losses) == {"itc", "itm", "itg"}
            for name, p in model.named_parameters():
                assert (p.grad is not None) == p.requires_grad, name
        optimizer.step()
        history.append({k: v.item() for k, v in losses.items()})
    assert history[-1]["itg"] < 0.7 * history[0]["itg"]
    assert sum(history[-1].values()) < sum(history[0].values())


def test_fit_logs_losses_and_retrieval(shapes_root, tmp_path):
    model = tiny()
    data = caption_data(shapes_root, 4)
    data.connect(model.processor())
    trainer = tiny_fit(model, data, 2, limit_val_batches=1, val_check_interval=2)
    metrics = trainer.callback_metrics
    for name in (
        "train/loss",
        "train/loss/itc",
        "train/loss/itm",
        "train/loss/itg",
        "val/loss",
        "val/itc_r1",
    ):
        assert name in metrics and torch.isfinite(metrics[name]), name
    assert 0 <= metrics["val/itc_r1"] <= 1


def test_a_stage_schedule_resumes_with_the_hard_negatives_of_an_uninterrupted_run(shapes_root, tmp_path):
    """The StagedModule base gives stage 1 stage schedules and per-step seeding: a run resumed from its step-2
    checkpoint (written by the first stage) enters the second stage at the next batch and draws the hard negatives
    of the uninterrupted run, so its losses are the same bit for bit (same computation on the same CPU)."""

    def fit(out, ckpt_path=None):
        schedule = StageSchedule(
            [Milestone(0, Stage(name="pretrain")), Milestone(2, Stage("heads", ["heads"]))]
        )
        model, record = tiny(stage=schedule), Record()
        data = caption_data(shapes_root, 4, seed=3)
        data.connect(model.processor())
        validating = {"limit_val_batches": 1, "val_check_interval": 2, "num_sanity_val_steps": 0}
        tiny_fit(model, data, 4, out, ckpt_path, 2, [record], plugins=[AtomicCheckpointIO()], **validating)
        return model, record

    model, full = fit(tmp_path / "full")
    assert model.stage.name == "heads" and not any(p.requires_grad for p in model.qformer.parameters())
    ckpt = next((tmp_path / "full").glob("*step=2*.ckpt"))
    saved = read_checkpoint(ckpt)
    assert saved["lit_mllm"]["stage"] == "pretrain" and saved["lit_mllm"]["stage_index"] == 0
    assert isinstance(saved["lit_mllm"]["run_seed"], int)
    assert any(k.startswith("qformer.") for k in saved["state_dict"])
    assert not any(k.startswith("vision_tower.") for k in saved["state_dict"])
    resumed_model, resumed = fit(tmp_path / "resumed", str(ckpt))
    assert resumed_model.stage.name == "heads"
    assert resumed.ids == full.ids[2:]
    assert resumed.losses == full.losses[2:]


# -- stage 1 -> stage 2 through the shipped configs ---------------------------------------------------------------


def test_stage1_checkpoint_starts_the_stage2_qformer_connector(shapes_root, tmp_path):
    """The config pair: configs/model/blip2_stage1.yaml runs a few steps and saves; configs/model/blip2.yaml with
    the connector's init_from at that checkpoint starts its Q-Former from it (the tower is rebuilt the same from
    the run seed, the projection is new)."""
    small = [
        *cli_args(shapes_root, tmp_path, batch_size=4),
        "--model.init_args.vision_tower.init_args.image_size",
        "32",
    ]
    captions = ["--data.init_args.train.shapesworld.init_args.path", "captions_train.json"]
    captions += [
        "--data.init_args.val.shapesworld.init_args.path",
        "captions_val.json",
        "--data.init_args.test",
        "null",
    ]
    stage1 = build_cli(
        ["--config", str(CONFIGS / "quickstart.yaml"), "--config", str(CONFIGS / "model" / "blip2_stage1.yaml"),
         *small, *captions],
        run=False,
    )  # fmt: skip
    model = stage1.model
    assert isinstance(model, QFormerPretraining)
    tiny_fit(model, stage1.datamodule, 2, out=tmp_path / "ckpt", save_every=2)
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert not any(k.startswith("vision_tower.") for k in saved)  # frozen: rebuilt from its source

    stage2 = build_cli(
        ["--config", str(CONFIGS / "quickstart.yaml"), "--config", str(CONFIGS / "model" / "blip2.yaml"),
         "--model.init_args.connector.init_args.init_from", str(ckpt), *small],
        run=False,
    ).model  # fmt: skip
    connector = stage2.connector.state_dict()
    trained = model.qformer.state_dict()
    for name, value in connector.items():
        if not name.startswith("proj."):
            assert torch.equal(value, trained[name]), name
    assert not torch.equal(
        connector["query_tokens"], QFormerConnector(64, 128, 32, 4, 64, 4, 256).query_tokens
    )
    for name, value in stage2.vision_tower.state_dict().items():  # the same frozen tower in both stages
        assert torch.equal(value, model.vision_tower.state_dict()[name]), name


def test_connector_init_from_errors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"connector.proj.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match="holds no 'qformer"):
        QFormerConnector(8, 8, 2, 1, 8, 2, 16, init_from=str(path))
    model = tiny()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items() if k.startswith("qformer.")}, str(path)
    )
    with pytest.raises(ValueError, match="lacks"):
        QFormerConnector(32, 8, 4, 4, QF, 4, 64, init_from=str(path))  # four layers, stage 1 had three
    conn = QFormerConnector(32, 8, 4, 3, QF, 4, 64, init_from=str(path))
    assert torch.equal(conn.layers[2].ffn.fc1.weight, model.qformer.layers[2].ffn.fc1.weight)


def stage1_args(root, out) -> list[str]:
    """configs/model/blip2_stage1.yaml's documented command on a small ShapesWorld (32 px images)."""
    return [
        "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(CONFIGS / "model" / "blip2_stage1.yaml"),
        "--data.init_args.train.shapesworld.init_args.path", "captions_train.json",
        "--data.init_args.val.shapesworld.init_args.path", "captions_val.json", "--data.init_args.test", "null",
        *cli_args(root, out, batch_size=4), "--model.init_args.vision_tower.init_args.image_size", "32",
    ]  # fmt: skip


def test_the_fit_command_describe_and_what_is_not_supported(shapes_root, tmp_path):
    from lit_mllm.cli import run
    from lit_mllm.commands import describe
    from lit_mllm.training.export import UnsupportedExport, check_llava_exportable
    from lit_mllm.training.memory import estimate_memory

    cli = run(["fit", *stage1_args(shapes_root, tmp_path), "--trainer.fast_dev_run", "1"])
    assert cli.trainer.state.finished and isinstance(cli.model, QFormerPretraining)
    assert torch.isfinite(cli.trainer.callback_metrics["val/itc_r1"])
    facts = describe.main(stage1_args(shapes_root, tmp_path))
    assert facts["image_tokens"] == 32 and facts["params_trainable/vision_tower"] == 0
    assert facts["params_trainable/qformer"] == facts["params/qformer"] > 0
    with pytest.raises(UnsupportedExport, match="not a PrefixFusionVLM"):
        check_llava_exportable(cli.model)
    with pytest.raises(TypeError, match="covers prefix-fusion models"):
        estimate_memory(cli.model, batch_size=2)


def test_shipped_bert_tokenizer_is_reproducible(tmp_path):
    import json

    from lit_mllm.nn.language.tokenizer import TINY_BERT_TOKENIZER_DIR, build_tiny_bert_tokenizer

    build_tiny_bert_tokenizer(tmp_path)
    shipped = json.loads((TINY_BERT_TOKENIZER_DIR / "tokenizer.json").read_text())
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"] == shipped["model"]
