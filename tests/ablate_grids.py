"""A tiny grid over the quickstart for the ablation tests: a one-layer-ish model on the suite's 32 px
ShapesWorld, no loader workers, a few steps per arm, a resume checkpoint every step."""

from __future__ import annotations

from pathlib import Path

import yaml

TINY_SET = {
    "trainer.enable_progress_bar": False,
    "trainer.log_every_n_steps": 1,
    "trainer.val_check_interval": None,
    "trainer.num_sanity_val_steps": 0,
    "trainer.callbacks": [],
    "data.init_args.num_workers": 0,
    "data.init_args.batch_size": 4,
    "data.init_args.samples_per_epoch": 8,
    "data.init_args.generate_if_missing": None,
    "model.init_args.vision_tower.init_args": {
        "image_size": 32,
        "hidden_size": 32,
        "num_layers": 2,
        "num_heads": 2,
        "feature_layer": -1,
    },
    "model.init_args.language_model.init_args": {
        "hidden_size": 32,
        "num_layers": 1,
        "num_heads": 2,
        "num_kv_heads": 1,
    },
    "model.init_args.scheduler.init_args.warmup_steps": 1,
}


def tiny_grid(data_root: Path, out: Path, **fields) -> dict:
    """A grid file's content: the quickstart made tiny, ``fields`` added (``axes``, ``seeds``, ...)."""
    node = {
        "study": "tiny",
        "out": str(out),
        "base": ["configs/quickstart.yaml"],
        "set": {**TINY_SET, "data.init_args.root": str(data_root)},
        "match": {"steps": 3},
        "checkpoint_every": 1,
    }
    node.update(fields)
    return node


def write_grid(path: Path, node: dict) -> Path:
    path.write_text(yaml.safe_dump(node, sort_keys=False))
    return path
