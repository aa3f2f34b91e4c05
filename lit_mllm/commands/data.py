"""``lit-mllm data shapesworld --out DIR``: write a generated dataset (ShapesWorld) to disk."""

from __future__ import annotations

from jsonargparse import CLI

from lit_mllm.data.shapesworld import write_shapesworld


def main(args: list[str]) -> None:
    """Parse ``args`` (a dataset name and its options) and write that dataset."""
    CLI({"shapesworld": write_shapesworld}, args=args, prog="lit-mllm data", description="Write datasets.")
