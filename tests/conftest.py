"""Shared fixtures: tiny towers, language models, a small ShapesWorld folder, and collated batches."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lit_mllm.data import Conversations, MixtureData, ShapesWorld, collate, read_llava  # noqa: E402
from lit_mllm.lit import PrefixFusionVLM  # noqa: E402
from lit_mllm.nn.language import TinyLlama  # noqa: E402
from lit_mllm.nn.vision import TinyCLIPVision  # noqa: E402
from lit_mllm.training import Stage  # noqa: E402


def tiny_clip_vision_config():
    """The tiny CLIP vision architecture the reference-comparison tests save and reload."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
    )


def tiny_model(stage: Stage | None = None, module: dict | None = None, **lm) -> PrefixFusionVLM:
    """The tiny prefix model of the suite (seeded); ``module``: more PrefixFusionVLM arguments, ``lm``: TinyLlama's."""
    torch.manual_seed(0)
    return PrefixFusionVLM(
        TinyCLIPVision(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2),
        TinyLlama(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, **lm),
        stage=stage,
        **(module or {}),
    )


@pytest.fixture
def model() -> PrefixFusionVLM:
    return tiny_model()


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny models run
    fastest on one thread; on a shared machine more threads only wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_hub(tmp_path_factory):
    """Tiny checkpoints standing in for every hub name the shipped configs use (see tests/stand_ins.py)."""
    from tests.stand_ins import build_tiny_hub

    return build_tiny_hub(tmp_path_factory.mktemp("hub"))


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sw") / "shapesworld"
    ShapesWorld(image_size=32, num_train=24, num_val=8, num_test=8, min_object_px=4).write(root)
    return root


def cli_args(data_root, out=None, batch_size: int = 4, cpu: bool = False) -> list[str]:
    """Command-line overrides the CLI tests share: the data at ``data_root``, no loader workers, small batches,
    TensorBoard under ``out``; ``cpu``: a one-device fp32 CPU trainer whatever the config asks for."""
    args = ["--data.init_args.root", str(data_root), "--data.init_args.num_workers", "0"]
    args += ["--data.init_args.batch_size", str(batch_size)]
    if out is not None:
        args += ["--trainer.logger.init_args.save_dir", str(out)]
    if cpu:
        args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true"]
    return args


def overfit_losses(model, root, steps: int, lr: float = 3e-3) -> list[float]:
    """Training losses of ``steps`` AdamW steps of ``model`` (its trainable parameters) on one batch of four
    ShapesWorld training samples from ``root``."""
    data = shapes_data(root, batch_size=4)
    data.connect(model.processor())
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))[0]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        loss = model.training_step(batch, step)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def shapes_data(root, **kwargs) -> MixtureData:
    """The quickstart's DataModule shape: ShapesWorld's LLaVA-format train/val/test files."""
    splits = {split: {"shapesworld": Conversations(f"{split}.json")} for split in ("train", "val", "test")}
    kwargs.setdefault("num_workers", 0)
    return MixtureData(str(root), **splits, **kwargs)


@pytest.fixture
def datamodule(shapes_root, model) -> MixtureData:
    dm = shapes_data(shapes_root, batch_size=4)
    dm.connect(model.processor())
    dm.setup("fit")
    return dm


@pytest.fixture
def batch(shapes_root, model) -> dict:
    """Four training samples of mixed length plus one text-only sample."""
    proc = model.processor()
    samples = read_llava(shapes_root / "train.json")[:4]
    text_only = read_llava(shapes_root / "train.json")[4]
    text_only.images = []
    text_only.turns[0] = type(text_only.turns[0])("user", text_only.turns[0].text.replace("<image>\n", ""))
    items = [proc(s) for s in samples + [text_only]]
    return collate(items, pad_token_id=proc.tokenizer.pad_token_id)


class Record(L.Callback):
    """Sample ids, losses and data figures of every training step."""

    def __init__(self) -> None:
        self.ids, self.losses, self.stats = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ids.append(batch.ids)
        self.losses.append(float(outputs["loss"]))
        stats = getattr(trainer.datamodule, "stats", None)
        self.stats.append(stats() if stats is not None else {})


def tiny_fit(
    model, data, max_steps, out=None, ckpt_path=None, save_every=None, callbacks=(), **trainer_kwargs
):
    """``Trainer.fit`` on CPU, quiet, no validation; with ``save_every`` a checkpoint every N steps into ``out``.
    ``trainer_kwargs`` override the Trainer's settings. Returns the trainer."""
    callbacks = list(callbacks)
    if save_every:
        callbacks.append(ModelCheckpoint(out, every_n_train_steps=save_every, save_top_k=-1))
    settings = {
        "max_steps": max_steps,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": bool(save_every),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "callbacks": callbacks,
        **trainer_kwargs,
    }
    trainer = L.Trainer(**settings)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer
