"""The README's promise: the quickstart learns to use the image. Minutes on 2 CPU cores, so marked slow."""

from pathlib import Path

import pytest

from lit_mllm.cli import run

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")


@pytest.mark.slow
def test_quickstart_beats_the_answer_baselines(tmp_path):
    cli = run(
        [
            "fit",
            "--config",
            QUICKSTART,
            "--data.init_args.root",
            str(tmp_path / "sw"),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "runs"),
        ]
    )
    acc = float(cli.trainer.callback_metrics["val/accuracy"])
    baselines = next(c for c in cli.trainer.callbacks if type(c).__name__ == "AnswerBaselines").scores
    assert acc > baselines["majority"] + 0.3
    assert acc > baselines["blind"] + 0.10
