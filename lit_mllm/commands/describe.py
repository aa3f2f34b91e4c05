"""``lit-mllm describe --config FILE``: build the model of a config (no data, no training) and print the figures
runs are compared on: parameters per part (the stage's table), image tokens per image, connector FLOPs per image.
"""

from __future__ import annotations

from lit_mllm.commands.lightning import build_cli
from lit_mllm.training.stages import trainable_table


def main(args: list[str]) -> dict:
    """Print the model's trainable-parameter table and its :meth:`describe` figures; return the figures."""
    model = build_cli(args, run=False).model
    facts = model.describe()
    print(trainable_table(model.parts(), model.stage))
    width = max(map(len, facts))
    for key, value in facts.items():
        if not key.startswith("params"):
            print(f"{key:<{width}}  {value:,}" if isinstance(value, int) else f"{key:<{width}}  {value}")
    return facts
