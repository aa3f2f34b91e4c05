"""Writes ``predict`` outputs as JSON Lines (``id``, ``prompt``, ``answer``, ``references``) into the run folder,
and prints the exact-match rate (the answer equals one of the references) where references exist."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info


class PredictionWriter(BasePredictionWriter):
    """Saves every prediction of a ``predict`` run to ``<run dir>/predictions.jsonl`` (or ``path``)."""

    def __init__(self, path: str | None = None) -> None:
        """
        Args:
            path: Output file; default ``predictions.jsonl`` in the trainer's log directory.
        """
        super().__init__(write_interval="epoch")
        self.path = path

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        rows = [row for batch in predictions for row in batch]
        path = Path(self.path or Path(trainer.log_dir or ".") / "predictions.jsonl")
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".partial")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(path)
        scored = [r for r in rows if r.get("references")]
        hits = sum(r["answer"].strip() in {ref.strip() for ref in r["references"]} for r in scored)
        rank_zero_info(
            f"wrote {len(rows)} predictions to {path}"
            + (f"; exact match {hits}/{len(scored)} = {hits / len(scored):.3f}" if scored else "")
        )
