"""lmms-eval adapter: a lit_mllm family module as an `lmms-eval <https://github.com/EvolvingLMMs-Lab/lmms-eval>`_
model, so its tasks run on our models without converting them. An optional extra: ``pip install
'lit-mllm[lmms-eval]'``.

In memory (during or after training)::

    from lmms_eval.evaluator import simple_evaluate
    from lit_mllm.eval.lmms_eval import LitMLLM

    results = simple_evaluate(model=LitMLLM(module, batch_size=8), tasks=["mme", "pope"])

From a run's saved config and a checkpoint, on lmms-eval's command line (the package registers the model name
``lit_mllm`` through the ``lmms_eval.models`` entry point)::

    lmms-eval --model lit_mllm --model_args config=runs/x/version_0/config.yaml,ckpt_path=last.ckpt --tasks mme

Each request of lmms-eval's simple-model interface, ``(context, generation kwargs | continuation, doc_to_visual,
doc_id, task, split)``, becomes a one-turn :class:`~lit_mllm.data.sample.Sample`: the task's images (PIL images
from ``doc_to_visual``, or image paths) before the context as the model's image placeholders (unless the context
already holds one per image), rendered by the module's own chat format through its
:meth:`~lit_mllm.lit.base.VLMModule.processor`. Generation batches are left-padded and decoded by
:meth:`~lit_mllm.lit.base.VLMModule.generate` with the module's generation settings, overridden by the task's
(``max_new_tokens``, ``temperature`` > 0 for sampling, ``top_p``, ``num_beams``), the reply cut at the first of
the task's ``until`` strings. Log-likelihood scores the continuation's tokens after the prompt (the chat format's
assistant header included, its end-of-turn token not): the summed log-probability and whether greedy decoding
would give exactly those tokens. Multi-round generation is not supported.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lit_mllm.data.collate import collate
from lit_mllm.data.processor import Processor
from lit_mllm.data.sample import Sample
from lit_mllm.data.sources import IMAGE_EXTENSIONS
from lit_mllm.nn.language.chat import IGNORE_INDEX, Turn

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
except ImportError as e:  # an optional extra
    raise ImportError(
        f"lit_mllm.eval.lmms_eval needs the lmms-eval package ({e}); install it with "
        "pip install 'lit-mllm[lmms-eval]'"
    ) from e

if TYPE_CHECKING:
    from lit_mllm.lit.base import VLMModule

MODEL_NAME = "lit_mllm"
"""The name lmms-eval knows the adapter by (``--model lit_mllm``)."""
SAMPLING_KEYS = ("max_new_tokens", "num_beams", "top_p")
"""Task generation kwargs passed on to :meth:`~lit_mllm.lit.base.VLMModule.generate` as they are."""


def manifest():
    """The ``lmms_eval.models`` entry point: registers :class:`LitMLLM` as ``lit_mllm`` (a simple model)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.LitMLLM")


def load_module(config: str | Path, ckpt_path: str | Path | None = None) -> VLMModule:
    """The family module of a run: built from the ``model`` section of its config (a run's saved
    ``config.yaml``, or any ``lit-mllm fit`` config without nested config files), then ``ckpt_path``'s weights
    loaded (a Lightning ``.ckpt`` or a ``.safetensors`` file), in eval mode."""
    import yaml
    from jsonargparse import ArgumentParser

    from lit_mllm.lit.base import VLMModule
    from lit_mllm.training.checkpoints import load_weights

    path = Path(config)
    node = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(node, dict) or not isinstance(node.get("model"), dict):
        raise ValueError(
            f"{path}: no 'model' section with a class_path; give the config.yaml a run saved (or the config it was "
            "trained with)"
        )
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(VLMModule, "model", required=True)
    module = parser.instantiate(parser.parse_object({"model": node["model"]})).model
    if ckpt_path is not None:
        load_weights(module, ckpt_path)
    return module.eval()


def _image_bytes(visual: Any, where: str) -> str | bytes:
    """An image for :class:`~lit_mllm.data.sample.Sample`: a PIL image as PNG bytes (lossless), or an image file
    path; videos and audio are refused."""
    from PIL import Image

    if isinstance(visual, Image.Image):
        buffer = io.BytesIO()
        visual.convert("RGB").save(buffer, format="PNG")
        return buffer.getvalue()
    if isinstance(visual, str | Path) and str(visual).lower().rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
        return str(visual)
    raise ValueError(
        f"{where}: the task gives a {type(visual).__name__} ({str(visual)[:80]!r}); the lit_mllm adapter takes "
        f"images (PIL images or {'/'.join(IMAGE_EXTENSIONS)} files), not video or audio"
    )


def _flatten(visuals: Any) -> list:
    """``doc_to_visual``'s result as a flat list (tasks return a list, a nested list, or None)."""
    if visuals is None:
        return []
    if not isinstance(visuals, list | tuple):
        return [visuals]
    return [v for item in visuals for v in _flatten(item)]


def _cut(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = min((k for k in (text.find(s) for s in until if s) if k >= 0), default=len(text))
    return text[:cut]


class LitMLLM(lmms):
    """A lit_mllm family module as an lmms-eval simple model (see the module docstring)."""

    is_simple = True

    def __init__(
        self,
        module: VLMModule | None = None,
        config: str | None = None,
        ckpt_path: str | None = None,
        batch_size: int | str | None = 1,
        device: str | None = None,
        max_batch_size: int | None = None,
    ) -> None:
        """
        Args:
            module: The family module to evaluate, in memory (left on its device; its training mode is restored
                after each call).
            config: Instead of ``module``: a run's saved ``config.yaml`` to build it from (see :func:`load_module`).
            ckpt_path: With ``config``: the checkpoint whose weights to load.
            batch_size: Requests per forward pass (lmms-eval passes its ``--batch_size``).
            device: With ``config``: where to put the module (default: CUDA when there is one, else the CPU).
            max_batch_size: Accepted for lmms-eval's interface; unused.
        """
        super().__init__()
        if (module is None) == (config is None):
            raise ValueError("LitMLLM takes a module or a config (with ckpt_path), exactly one of them")
        if module is None:
            module = load_module(config, ckpt_path)
            module.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        elif ckpt_path is not None or device is not None:
            raise ValueError("LitMLLM(module=...): ckpt_path and device are for a module built from config")
        if isinstance(batch_size, str) and not batch_size.isdigit():
            raise ValueError(
                f"LitMLLM batch_size must be a positive integer, got {batch_size!r} ('auto' is not supported)"
            )
        self.batch_size = int(batch_size or 1)
        if self.batch_size < 1:
            raise ValueError(f"LitMLLM batch_size must be a positive integer, got {batch_size!r}")
        self.module = module
        self.processor: Processor = module.processor()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self._rank, self._world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()

    # -- requests -> samples ------------------------------------------------------------------------------------
    def _sample(self, request: Instance, context: str) -> Sample:
        """One user turn (the request's images, then ``context``) awaiting the assistant's reply."""
        doc_to_visual, doc_id, task, split = request.args[2:6]
        where = f"lmms-eval task {task!r} split {split!r} doc {doc_id}"
        visuals = _flatten(doc_to_visual(self.task_dict[task][split][doc_id])) if doc_to_visual else []
        images = [_image_bytes(v, where) for v in visuals]
        token = self.processor.image_token
        placed = context.count(token)
        if placed == 0 and images:  # LLaVA's way: the placeholders on a line of their own before the text
            placeholders = " ".join([token] * len(images))
            context = f"{placeholders}\n{context}" if context else placeholders
        elif placed != len(images):
            raise ValueError(
                f"{where}: the context holds {placed} {token} placeholder(s) for {len(images)} image(s); it "
                f"needs none (they are put before the text) or one per image"
            )
        turns = [Turn("user", context), Turn("assistant", "")]
        return Sample(f"{task}/{split}/{doc_id}", turns, images, where)

    def _device(self) -> torch.device:
        return next(self.module.parameters()).device

    def _run(self, work: Callable[[], list]) -> list:
        """``work()`` with the module in eval mode and without autograd; its mode is restored afterwards."""
        training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                return work()
        finally:
            self.module.train(training)

    # -- generation ---------------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """One reply per request, in request order; requests with the same generation kwargs share batches."""
        groups: dict[str, list[int]] = {}
        for k, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(k)
        replies: list[str] = [""] * len(requests)

        def work() -> list:
            for indices in groups.values():
                overrides, until = self._generation_kwargs(requests[indices[0]].args[1])
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start : start + self.batch_size]
                    items = [
                        self.processor(self._sample(requests[k], requests[k].args[0]), True) for k in chunk
                    ]
                    batch = collate(items, self.processor.tokenizer.pad_token_id, padding_side="left")
                    for k, text in zip(chunk, self.module.generate(batch.to(self._device()), **overrides)):
                        replies[k] = _cut(text, until).strip()
            return replies

        return self._run(work)

    def _generation_kwargs(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        """``generate`` overrides and stop strings from a task's generation kwargs."""
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        overrides = {k: gen_kwargs[k] for k in SAMPLING_KEYS if gen_kwargs.get(k) is not None}
        temperature = gen_kwargs.get("temperature")
        sample = bool(gen_kwargs.get("do_sample", False)) or (temperature is not None and temperature > 0)
        if "do_sample" in gen_kwargs or temperature is not None:
            overrides["do_sample"] = sample
        if sample and temperature:
            overrides["temperature"] = float(temperature)
        if not sample:
            overrides.pop("top_p", None)
        return overrides, until

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "the lit_mllm adapter does not support lmms-eval's multi-round generation tasks "
            "(generate_until_multi_round); run single-round tasks, or evaluate such a task through lit-mllm's own "
            "multi-turn conversations"
        )

    # -- log-likelihood -----------------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """``(sum of the continuation's token log-probabilities, whether greedy decoding gives it)`` per request."""
        results: list[tuple[float, bool]] = []

        def work() -> list:
            for start in range(0, len(requests), self.batch_size):
                items = [self._scored_item(r) for r in requests[start : start + self.batch_size]]
                batch = collate(items, self.processor.tokenizer.pad_token_id).to(self._device())
                logits, targets, which = self.module.supervised_logits(batch)  # [S, V], [S], [S]
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                picked = logprobs.gather(1, targets[:, None])[:, 0]
                greedy = logprobs.argmax(dim=-1) == targets
                for i in range(len(items)):
                    mine = which == i
                    results.append((picked[mine].sum().item(), bool(greedy[mine].all())))
            return results

        return self._run(work)

    def _scored_item(self, request: Instance) -> dict:
        """The processed prompt (up to the assistant's turn) followed by the continuation's tokens, which alone are
        labelled."""
        context, continuation, _, doc_id, task, split = request.args[:6]
        if callable(continuation):
            continuation = continuation(self.task_dict[task][split][doc_id])
        if isinstance(continuation, list):  # some tasks' doc_to_target gives the accepted answers
            continuation = continuation[0]
        item = self.processor(self._sample(request, context), for_generation=True)
        tokens = self.processor.tokenizer(str(continuation), add_special_tokens=False)["input_ids"]
        if not tokens:
            raise ValueError(
                f"lmms-eval task {task!r} doc {doc_id}: empty continuation {continuation!r} to score"
            )
        prompt = item["input_ids"]
        continuation_ids = torch.tensor(tokens, dtype=torch.long)
        item = {k: v for k, v in item.items() if k not in ("prompt", "references")}
        item["input_ids"] = torch.cat([prompt, continuation_ids])
        item["labels"] = torch.cat([torch.full_like(prompt, IGNORE_INDEX), continuation_ids])
        return item
