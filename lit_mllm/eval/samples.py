"""A few generations with their images in TensorBoard at every validation, so a person can see what the numbers
mean: the same validation samples each time (the first ``num_samples`` of each validation source), their prompt,
the model's reply with its generation settings and the accepted answers, under the ``samples`` text tab; the images
under ``samples/<source>/<id>`` (logged once).

    trainer:
      callbacks:
        - class_path: lit_mllm.eval.GenerationSamples
          init_args: {num_samples: 4}
"""

from __future__ import annotations

import numpy as np
import torch
from lightning import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from lit_mllm.data.collate import collate
from lit_mllm.data.images import load_image
from lit_mllm.data.sample import DataError, Sample


class GenerationSamples(Callback):
    """Logs ``num_samples`` generations per validation source to TensorBoard after each validation (rank 0; a no-op
    without a TensorBoard logger, and for a module that generates no text, such as BLIP-2 stage 1 stacked on the
    quickstart, which says so once)."""

    def __init__(self, num_samples: int = 4) -> None:
        """
        Args:
            num_samples: Samples shown per validation source.
        """
        if num_samples < 1:
            raise ValueError(f"GenerationSamples num_samples={num_samples}; give at least 1")
        self.num_samples = num_samples
        self._logged_images: set[str] = set()
        self._said_no_generation = False

    def picked(self, datamodule, image_token: str) -> list[Sample]:
        """The first ``num_samples`` usable samples of each validation source (bad records are passed over)."""
        out = []
        for name, source in datamodule.sources("validate").items():
            taken = 0
            for i in range(len(source)):
                if taken == self.num_samples:
                    break
                try:
                    sample = source.sample(i, image_token)
                except DataError:
                    continue
                if sample.turns:  # a conversation: something to answer
                    sample.source = name
                    out.append(sample)
                    taken += 1
        return out

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "sources"):
            return
        if not callable(getattr(pl_module, "generate", None)):  # e.g. BLIP-2 stage 1 or CLIP pretraining
            if not self._said_no_generation:
                rank_zero_info(
                    f"GenerationSamples: {type(pl_module).__name__} generates no text; no samples logged"
                )
                self._said_no_generation = True
            return
        processor = pl_module.processor()
        samples = self.picked(datamodule, processor.image_token)
        if not samples:
            return
        items = [processor(s, for_generation=True) for s in samples]
        batch = collate(items, processor.tokenizer.pad_token_id, padding_side="left").to(pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            replies = pl_module.generate(batch)
        pl_module.train(was_training)
        rows = ["| source | id | prompt | reply | accepted |", "|---|---|---|---|---|"]
        for sample, item, reply in zip(samples, items, replies, strict=True):
            cells = [sample.source, sample.id, item["prompt"], reply, " / ".join(item["references"])]
            rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
            self._log_images(logger, sample)
        settings = ", ".join(f"{k}={v}" for k, v in pl_module.generation.kwargs().items())
        text = f"step {trainer.global_step}, generation: {settings}\n\n" + "\n".join(rows)
        logger.experiment.add_text("samples", text, trainer.global_step)

    def _log_images(self, logger: TensorBoardLogger, sample: Sample) -> None:
        tag = f"samples/{sample.source}/{sample.id}"
        if tag in self._logged_images or not sample.images:
            return
        self._logged_images.add(tag)
        for k, ref in enumerate(sample.images):
            pixels = np.asarray(load_image(ref, sample, k))  # [H, W, 3] uint8
            logger.experiment.add_image(
                f"{tag}/{k}" if len(sample.images) > 1 else tag, pixels, 0, dataformats="HWC"
            )


def _cell(text: str) -> str:
    """Text fit for a Markdown table cell (TensorBoard renders the text tab as Markdown)."""
    return text.replace("|", "\\|").replace("\n", "<br>")
