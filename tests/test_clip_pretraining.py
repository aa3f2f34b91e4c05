"""CLIP pretraining (lit_mllm/lit/clip_pretraining.py) and the bridge to the VLMs' towers: the loss is symmetric
InfoNCE at the learned logit scale, computed here by hand; a few steps lower it; retrieval accuracy on hand-made
similarity matrices; the text tower reads exactly each sample's caption and end token; a VLM whose tower names the
pretraining checkpoint as its weights has exactly the pretrained tower's weights (the blocks past its feature layer
skipped), and a tower of other sizes, a later feature layer or a wrong prefix is refused."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from lit_mllm.data import Captions, MixtureData
from lit_mllm.lit import CLIPPretraining, PrefixFusionVLM
from lit_mllm.lit.clip_pretraining import caption_tokens, retrieval_accuracy
from lit_mllm.nn.clip import TinyCLIPText
from lit_mllm.nn.language import TinyLlama
from lit_mllm.nn.vision import TinyCLIPVision
from lit_mllm.nn.vision.base import tower_state
from lit_mllm.training.stages import Stage

TOWER = dict(image_size=32, patch_size=8, hidden_size=32, num_layers=3, num_heads=2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; on a shared machine more threads only wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def clip_model(**tower) -> CLIPPretraining:
    torch.manual_seed(0)
    vision = TinyCLIPVision(**{**TOWER, "feature_layer": -1, **tower})
    return CLIPPretraining(vision, TinyCLIPText(hidden_size=32, num_layers=1, num_heads=2), embed_dim=16)


def caption_data(root, model: CLIPPretraining, batch_size: int = 8) -> MixtureData:
    data = MixtureData(
        str(root),
        train={"captions": Captions("captions_train.jsonl")},
        val={"captions": Captions("captions_val.jsonl")},
        batch_size=batch_size,
        num_workers=0,
    )
    data.connect(model.processor())
    data.setup("fit")
    return data


def first_batch(root, model: CLIPPretraining, batch_size: int = 8):
    return next(iter(caption_data(root, model, batch_size).train_dataloader()))[0]


def infonce(images: torch.Tensor, texts: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric InfoNCE written out: for each image, -log of the softmax weight of its own caption among all the
    captions, and the same for each caption; the mean of the two means."""
    sims = (images @ texts.T).double() * scale  # [B, B]
    n = sims.shape[0]
    image_side = [-(sims[i, i] - torch.log(torch.exp(sims[i]).sum())) for i in range(n)]
    text_side = [-(sims[j, j] - torch.log(torch.exp(sims[:, j]).sum())) for j in range(n)]
    return (torch.stack(image_side).mean() + torch.stack(text_side).mean()) / 2


def test_the_loss_is_symmetric_infonce_at_the_learned_logit_scale(shapes_root):
    model = clip_model()
    with torch.no_grad():
        model.head.logit_scale.fill_(math.log(7.5))
    batch = first_batch(shapes_root, model)
    images, texts, scale = model(batch)
    assert images.shape == texts.shape == (8, 16)
    assert torch.allclose(images.norm(dim=-1), torch.ones(8)) and torch.allclose(
        texts.norm(dim=-1), torch.ones(8)
    )
    assert scale.item() == pytest.approx(7.5)
    loss = model.loss(images, texts, scale)
    expected = infonce(images.detach(), texts.detach(), 7.5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert 0 < loss.item() < 2 * math.log(8)  # not a degenerate value: near log(B) for an untrained model
    loss.backward()
    assert model.head.logit_scale.grad.abs() > 0  # the temperature learns


def test_the_logit_scale_is_clipped_at_its_ceiling():
    model = clip_model()
    with torch.no_grad():
        model.head.logit_scale.fill_(math.log(500.0))
    scale = model.head.scale()
    assert scale.item() == pytest.approx(100.0)
    scale.backward()
    assert model.head.logit_scale.grad.item() == 0  # past the ceiling it no longer grows


def test_a_few_steps_reduce_the_loss(shapes_root):
    """Overfitting one batch of 8 pairs: past the plateau at chance (log 8, every pair alike) within 50 steps."""
    model = clip_model()
    batch = first_batch(shapes_root, model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    model.train()
    losses = []
    for step in range(50):
        optimizer.zero_grad()
        loss = model.training_step(batch, step)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * math.log(8) < losses[0], losses
    with torch.no_grad():
        images, texts, _ = model(batch)
    assert min(retrieval_accuracy(images @ texts.T)) > 0.5  # the pairs are found again, both ways


def test_a_locked_tower_stays_in_the_checkpoint():
    """LiT's stage freezes the tower, yet the checkpoint keeps every weight (a VLM's tower loads from it) and is
    loaded strictly; the stage machinery is the shared base's (optimizer groups over the trainable parts only)."""
    torch.manual_seed(0)
    lit = Stage(name="lit", trainable=["text_tower", "head"])
    model = CLIPPretraining(
        TinyCLIPVision(**TOWER), TinyCLIPText(hidden_size=32, num_layers=1, num_heads=2), 16, stage=lit
    )
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    model.train()
    assert not model.vision_tower.training and model.text_tower.training
    assert {g["part"] for g in model.configure_optimizers().param_groups} == {"text_tower", "head"}
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"].keys() == model.state_dict().keys()
    assert checkpoint["lit_mllm"]["stage"] == "lit" and model.strict_loading
    model.on_load_checkpoint(checkpoint)


def test_retrieval_accuracy_on_a_hand_made_matrix():
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # image 0 -> caption 0: right
            [0.8, 0.7, 0.1],  # image 1 -> caption 0: wrong
            [0.0, 0.2, 0.5],  # image 2 -> caption 2: right
        ]
    )
    image_to_text, text_to_image = retrieval_accuracy(logits)
    assert image_to_text.item() == pytest.approx(2 / 3)
    # caption 0 -> image 0 (0.9 > 0.8), caption 1 -> image 1 (0.7), caption 2 -> image 2 (0.5): all right
    assert text_to_image.item() == pytest.approx(1.0)
    tied = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # identical captions: only the first is retrieved
    assert [v.item() for v in retrieval_accuracy(tied)] == [0.5, 0.5]


def test_the_text_tower_reads_each_caption_and_its_end_token(shapes_root):
    model = clip_model()
    data = caption_data(shapes_root, model, batch_size=4)
    batch = next(iter(data.train_dataloader()))[0]
    tok = model.text_tower.tokenizer
    ids, mask = caption_tokens(batch, tok.pad_token_id)
    source = data.sources("fit")["captions"]
    by_id = {source.sample(i, "<image>").id: i for i in range(len(source))}
    for row, sample_id in enumerate(batch.ids):
        caption = source.sample(by_id[sample_id], "<image>").turns[-1].text
        expected = tok(caption, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ids[row][mask[row].bool()].tolist() == expected
        assert ids[row][~mask[row].bool()].eq(tok.pad_token_id).all()
    assert batch.pixel_values.shape == (4, 3, 32, 32)  # the tower's side


@pytest.fixture(scope="module")
def pretrained(shapes_root, tmp_path_factory):
    """A CLIP pretraining run of two steps through Lightning, and its checkpoint."""
    model = clip_model()
    data = caption_data(shapes_root, model, batch_size=4)
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=data)
    path = tmp_path_factory.mktemp("clip") / "last.ckpt"
    trainer.save_checkpoint(path)
    return model, path


def test_a_vlm_tower_loads_exactly_the_pretrained_weights(pretrained):
    model, path = pretrained
    trained = {k: v for k, v in model.vision_tower.state_dict().items()}
    torch.manual_seed(1)
    fresh = TinyCLIPVision(**TOWER, feature_layer=-2)
    tower = TinyCLIPVision(**TOWER, feature_layer=-2, weights=str(path))
    vlm = PrefixFusionVLM(tower, TinyLlama(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1))
    own = vlm.vision_tower.state_dict()
    assert len(own) < len(trained)  # block 3 of 3 is not read at feature_layer -2
    for name, value in own.items():
        assert torch.equal(value, trained[name]), name
    assert any(not torch.equal(v, fresh.state_dict()[k]) for k, v in own.items())  # not the random init
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the VLM's features are the pretrained tower's second block, CLS dropped
        hidden = model.vision_tower.model(pixel_values=pixels, output_hidden_states=True).hidden_states[2]
        assert torch.allclose(vlm.vision_tower(pixels), hidden[:, 1:], atol=1e-6)


def test_the_quickstart_takes_the_pretrained_tower_from_its_config(pretrained, shapes_root, tmp_path):
    """The documented command: the quickstart with its tower's ``weights`` pointing at the checkpoint (and the
    pretraining run's sizes)."""
    from lit_mllm.commands.lightning import build_cli
    from tests.conftest import cli_args

    model, path = pretrained
    tower = "--model.init_args.vision_tower.init_args."
    sizes = [a for k, v in TOWER.items() for a in (f"{tower}{k}", str(v))]
    cli = build_cli(
        [
            "--config",
            "configs/quickstart.yaml",
            *sizes,
            f"{tower}weights",
            str(path),
            *cli_args(shapes_root, tmp_path),
        ],
        run=False,
    )
    trained = model.vision_tower.state_dict()
    for name, value in cli.model.vision_tower.state_dict().items():
        assert torch.equal(value, trained[name]), name


def test_towers_that_do_not_fit_the_weights_are_refused(pretrained):
    _, path = pretrained
    with pytest.raises(ValueError, match="another shape"):
        TinyCLIPVision(**{**TOWER, "hidden_size": 16}, weights=str(path))
    with pytest.raises(ValueError, match="lack"):  # 4 blocks asked of a 3-block tower
        TinyCLIPVision(**{**TOWER, "num_layers": 4}, feature_layer=-1, weights=str(path))
    with pytest.raises(ValueError, match="starts with 'tower.'.*'head.', 'text_tower.', 'vision_tower.'"):
        TinyCLIPVision(**TOWER, weights=str(path), weights_prefix="tower.")
    state = tower_state(path)
    state["model.vision_model.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="match nothing.*extra"):
        TinyCLIPVision(**TOWER).load_pretrained(state)
