"""What every family's LightningModule shares, so a family says only how visual features reach the LLM.

The base owns the three parts every family has and the vision path through them::

    pixel_values [I, 3, S, S] (uint8) --normalise--> --vision_tower--> [I, N, D_v] --connector--> [I, T, D_llm]

(a frozen tower runs without autograd; a text-only batch under DDP runs a blank image so the connector takes part
in the backward pass on every rank), the processor handed to the DataModule, the stage (what trains: nested parts,
the innermost named part wins), the language-modelling loss on supervised tokens, the injected evaluation metrics,
and generation. Stages and stage schedules, optimizer groups, per-step seeding, ``describe``'s parameter counts and
trainable-only checkpoints come from :class:`~lit_mllm.lit.staged.StagedModule`, which the pretraining modules
share.

A family implements :meth:`VLMModule.language_inputs`: given the batch and its image features, the LLM's input
embeddings and any per-layer inputs its decoder-layer wrappers read. It adds its own modules in ``__init__``,
names them in :meth:`VLMModule.parts`, gives :meth:`VLMModule.default_stage`, and ends ``__init__`` with
:meth:`VLMModule.freeze_and_load`. See docs/families.md.

Metric names are ``split/name``: ``train/loss``, ``train/loss/<source>``, ``val/loss``, ``val/<metric>``,
``val/<task>/loss`` and ``val/<task>/<metric>`` (per source, where the split has several), ``test/...``.
"""

from __future__ import annotations

import warnings
from abc import abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lit_mllm.data.batch import Batch
from lit_mllm.data.collate import collate
from lit_mllm.data.feature_cache import FeatureCache, weights_digest
from lit_mllm.data.images import ImageTransform, normalize
from lit_mllm.data.layouts import ImageLayout, Resize
from lit_mllm.data.processor import Processor
from lit_mllm.data.shapesworld import ALL_KINDS
from lit_mllm.eval.choice import choice_samples, sum_by_sample
from lit_mllm.eval.generation import GenerationConfig, cut_at_stop
from lit_mllm.eval.metrics import EvalMetric, EvalOutputs, PerGroup, ReplyExactMatch
from lit_mllm.lit.staged import StagedModule
from lit_mllm.nn.connectors import ConnectorFactory, MLPConnector, connector_flops
from lit_mllm.nn.language.chat import IGNORE_INDEX
from lit_mllm.nn.language.layers import LayerInputs
from lit_mllm.nn.language.model import LanguageModel
from lit_mllm.nn.vision.base import VisionTower
from lit_mllm.training.stages import Ownership, Parts, Stage, StageSchedule, part_trains


class NoSupervisedTokens(ValueError):
    """A batch has nothing to learn: its loss would be a silent zero."""


def supervised(labels: Tensor) -> Tensor:
    """``[R, L-1]`` mask of the positions whose next token is learned (``labels[:, 1:] != -100``)."""
    return labels[:, 1:] != IGNORE_INDEX


def token_losses(logits: Tensor, target: Tensor, ids: list[str] | None = None) -> Tensor:
    """fp32 cross-entropy of each supervised position (``logits [S, V]``, ``target [S]``) -> ``[S]``.

    A batch with no supervised token raises :class:`NoSupervisedTokens` naming its samples."""
    if target.numel() == 0:
        raise NoSupervisedTokens(
            f"batch of samples {ids} has no supervised token (every label is -100); check the chat format "
            "and that each sample ends with a non-empty assistant reply"
        )
    return F.cross_entropy(logits.float(), target, reduction="none")


def lm_token_losses(logits: Tensor, labels: Tensor, ids: list[str] | None = None) -> Tensor:
    """Next-token cross-entropy of each supervised token, ``[S]`` in row-major order of the ``supervised(labels)``
    mask: ``logits [B, L, V]`` predict ``labels [B, L]`` shifted by one (see :func:`token_losses`)."""
    mask = supervised(labels)
    return token_losses(logits[:, :-1][mask], labels[:, 1:][mask], ids)


def lm_loss(logits: Tensor, labels: Tensor, ids: list[str] | None = None) -> Tensor:
    """Mean next-token cross-entropy over supervised tokens (:func:`lm_token_losses`)."""
    return lm_token_losses(logits, labels, ids).mean()


def sums_by_source(
    losses: Tensor, of_token: Tensor, sources: list[str], names: list[str]
) -> tuple[Tensor, Tensor]:
    """``(sums [N], counts [N])`` of the token ``losses [S]`` of each source in ``names``: token ``t`` belongs to
    sample ``of_token[t]`` of a batch whose samples come from ``sources`` (each one of ``names``)."""
    of_sample = torch.tensor([names.index(s) for s in sources], device=losses.device)
    owner = of_sample[of_token]
    sums = torch.zeros(len(names), device=losses.device).index_add_(0, owner, losses.float())
    return sums, torch.bincount(owner, minlength=len(names))


@dataclass
class LanguageInputs:
    """What a family hands the language model for one batch."""

    embeds: Tensor
    """``[R, L, D_llm]`` input embeddings (prefix fusion: image features spliced in at the image tokens)."""
    layer_inputs: LayerInputs | None = None
    """What the family's decoder-layer wrappers read at every layer call, in the forward pass and at each generation
    step (cross-attention: the visual features and media masks); a dataclass of the family's own."""


def default_metrics() -> dict[str, EvalMetric]:
    """The metrics of a config that names none: ``accuracy`` (teacher-forced reply exact match) and ``by_kind``,
    the same per question kind of samples whose ``meta`` names one (ShapesWorld's; nothing is logged for data
    without kinds)."""
    return {
        "accuracy": ReplyExactMatch(),
        "by_kind": PerGroup(ReplyExactMatch(), key="kind", groups=list(ALL_KINDS)),
    }


def _update(metric: EvalMetric, outputs: EvalOutputs) -> None:
    """Update ``metric`` with the samples of ``outputs`` from the sources it scores (its ``tasks``)."""
    if metric.tasks is None:
        metric.update_from(outputs)
        return
    rows = [i for i, source in enumerate(outputs.batch.sources) if metric.scores(source)]
    if len(rows) == len(outputs.batch):
        metric.update_from(outputs)
    elif rows:
        metric.update_from(outputs.select(rows))


class VLMModule(StagedModule):
    """Base of the family modules: a vision tower, a connector and a decoder LLM (see the module docstring)."""

    parts_args: tuple[str, ...] = (
        "vision_tower",
        "language_model",
        "connector",
        "image_layout",
        "optimizer",
        "scheduler",
        "metrics",
        "feature_cache",
    )
    """Constructor arguments that are parts or factories (modules, callables): kept out of the hyperparameters
    (a family with parts of its own adds their names)."""

    def __init__(
        self,
        vision_tower: VisionTower,
        language_model: LanguageModel,
        connector: ConnectorFactory = MLPConnector,
        image_layout: ImageLayout | None = None,
        stage: Stage | StageSchedule | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        generation: GenerationConfig | None = None,
        metrics: dict[str, EvalMetric] | None = None,
        feature_cache: FeatureCache | None = None,
    ) -> None:
        """Families call this first, add their modules, and end with :meth:`freeze_and_load`."""
        super().__init__(stage, optimizer, scheduler)
        self.vision_tower = vision_tower
        self.language_model = language_model
        self.connector = connector(vision_tower.hidden_size, language_model.hidden_size)
        self.tokens_per_image = self.connector.num_tokens(vision_tower.num_features)
        self.image_layout = image_layout or Resize()
        self.generation = generation or GenerationConfig()
        metrics = default_metrics() if metrics is None else metrics
        for name, metric in metrics.items():
            if not isinstance(metric, EvalMetric):
                raise TypeError(
                    f"metric {name!r} is a {type(metric).__name__}; evaluation metrics subclass "
                    "lit_mllm.eval.EvalMetric (they read the batch, logits and generations of a step)"
                )
        self.split_metrics = nn.ModuleDict(
            {split: nn.ModuleDict({n: m.clone() for n, m in metrics.items()}) for split in ("val", "test")}
        )
        self.split_losses = nn.ModuleDict({split: MeanMetric() for split in ("val", "test")})
        # per task (a split's source) when a split has several: {split: {task: {name: metric}}} and
        # {split: {task: loss}}, built in setup
        self.task_metrics = nn.ModuleDict()
        self.task_losses = nn.ModuleDict()
        self.feature_cache = feature_cache
        self._tower_digest: str | None = None  # weights digest of the frozen tower, for the cache key
        # The checkpoint's hyperparameters: the settings of this call and of the family's own __init__ (Lightning
        # collects the arguments of each constructor up the call chain), not the parts, which the config rebuilds.
        self.save_hyperparameters(ignore=list(self.parts_args))

    def check_schedule(self, parts: Parts) -> None:
        """Refuse a feature cache when a stage of the run trains the tower (its features change every step)."""
        if self.feature_cache is None:
            return
        tower = {id(p) for p in self.vision_tower.parameters()}
        for milestone in self.schedule.stages:
            plan = Ownership(parts, milestone.stage)
            if any(owner.trains for key, (_, _, owner) in plan.params.items() if key in tower):
                raise ValueError(
                    f"feature_cache is set but stage {milestone.stage.name!r} trains the vision tower (or some of "
                    "its blocks or adapters), whose features then change at every step: remove feature_cache, or "
                    "keep the tower frozen (run a stage that trains it as a separate run without the cache)"
                )

    # -- what a family provides -------------------------------------------------------------------------------
    @classmethod
    def default_stage(cls) -> Stage:
        """What trains when the config names no stage (or a stage without ``trainable``): LLaVA's finetune stage,
        connector + language model. Families override it."""
        return Stage(name="finetune", trainable=["connector", "language_model"])

    def parts(self) -> Parts:
        """The named parts a stage can train; a family adds its own (which may sit inside these, e.g. one
        cross-attention block per decoder layer)."""
        return {
            "vision_tower": self.vision_tower,
            "connector": self.connector,
            "language_model": self.language_model,
        }

    @abstractmethod
    def language_inputs(self, batch: Batch, images: Tensor | None) -> LanguageInputs:
        """The LLM's inputs for ``batch`` given its image features ``images [I, T, D_llm]`` (None: no image)."""

    # -- the vision path --------------------------------------------------------------------------------------
    def processor(self) -> Processor:
        """The processor the DataModule uses to turn samples into this model's inputs."""
        tower, lm = self.vision_tower, self.language_model
        return Processor(
            tokenizer=lm.tokenizer,
            chat_format=lm.chat_format,
            image_transform=ImageTransform(tower.image_size, self.image_layout),
            image_token=lm.image_token,
            image_token_id=lm.image_token_id,
            tokens_per_image=self.tokens_per_image,
            max_length=lm.max_length,
            eval_prompts=self._needs_generation(),
            image_keys=self.feature_cache is not None,
        )

    def encode_images(self, pixel_values: Tensor, image_keys: list[str] | None = None) -> Tensor:
        """``[I, 3, S, S] -> [I, T, D_llm]``; a frozen tower runs without autograd. uint8 images (what the
        processor gives) are normalised here with the tower's mean/std; float input is taken as normalised.

        With a :class:`~lit_mllm.data.feature_cache.FeatureCache` and the batch's ``image_keys`` (the processor
        gives them when the cache is set), the tower runs only on the inputs the cache misses; the key of the
        features is :meth:`feature_identity`."""
        trains = part_trains(self.parts(), "vision_tower")
        if self.feature_cache is None or image_keys is None:
            features = self._tower_features(pixel_values, trains)  # [I, N, D_v]
        elif trains:
            raise RuntimeError(
                "the vision tower trains but the model has a feature cache, which serves only a frozen tower; "
                "something unfroze the tower outside the stage (the stage was checked when the model was built)"
            )
        else:
            features = self.feature_cache.features(
                self.feature_identity(pixel_values.device),
                pixel_values,
                image_keys,
                lambda pixels: self._tower_features(pixels, False),
            )
        return self.connector(features)  # [I, T, D_llm]

    def _tower_features(self, pixel_values: Tensor, trains: bool) -> Tensor:
        """``[I, 3, S, S] -> [I, N, D_v]``: normalise uint8 pixels and run the tower (autograd only if it trains)."""
        tower = self.vision_tower
        if pixel_values.dtype == torch.uint8:
            pixel_values = normalize(pixel_values, tower.mean, tower.std)
        with torch.set_grad_enabled(torch.is_grad_enabled() and trains):
            return tower(pixel_values)  # [I, N, D_v]

    def feature_identity(self, device: torch.device) -> dict:
        """Everything that changes the frozen tower's features, as the feature cache's key: the tower's class,
        weights digest and settings (its public scalar attributes: feature layer, image size, prefix tokens, ...),
        the normalisation, the image layout, the weights' dtype, the autocast dtype and the device type. The
        weights digest is computed once per fit / validation / test / predict run."""
        tower = self.vision_tower
        if self._tower_digest is None:
            self._tower_digest = weights_digest(tower)
        settings = {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in sorted(vars(tower).items())
            if not k.startswith("_") and k != "training" and isinstance(v, int | float | str | bool | tuple)
        }
        first = next(tower.parameters(), None)
        autocast = torch.is_autocast_enabled(device.type)
        return {
            "tower": f"{type(tower).__module__}.{type(tower).__qualname__}",
            "weights": self._tower_digest,
            "settings": settings,
            "image_size": tower.image_size,
            "num_features": tower.num_features,
            "mean": list(tower.mean),
            "std": list(tower.std),
            "layout": repr(self.image_layout),
            "param_dtype": str(first.dtype if first is not None else None),
            "autocast": str(torch.get_autocast_dtype(device.type)) if autocast else None,
            "device": device.type,
        }

    def inputs(self, batch: Batch) -> LanguageInputs:
        """The family's :meth:`language_inputs` for ``batch``, its images encoded. A text-only batch under DDP runs
        a blank image so the connector (and tower) take part in the backward pass like on every other rank; its
        contribution is exactly zero."""
        images = None
        if batch.pixel_values is not None:
            images = self.encode_images(batch.pixel_values, batch.image_keys)
        inputs = self.language_inputs(batch, images)
        if images is None and self.needs_blank_image():
            tower = self.vision_tower
            blank = inputs.embeds.new_zeros(1, 3, tower.image_size, tower.image_size)
            inputs.embeds = inputs.embeds + 0.0 * self.encode_images(blank).sum()
        return inputs

    def needs_blank_image(self) -> bool:
        """Whether a text-only batch runs a blank image: when training under DDP with a trainable tower or connector
        (DDP expects a gradient for every trainable parameter on every rank)."""
        parts = self.parts()
        return (
            self.training
            and torch.distributed.is_initialized()
            and (part_trains(parts, "connector") or part_trains(parts, "vision_tower"))
        )

    def hidden_states(self, batch: Batch) -> Tensor:
        """``[R, L, D_llm]`` final hidden states of the LLM for a collated batch."""
        inputs = self.inputs(batch)
        return self.language_model.hidden_states(
            inputs.embeds, batch.attention_mask, batch.position_ids, layer_inputs=inputs.layer_inputs
        )

    def forward(self, batch: Batch) -> Tensor:
        """Logits ``[R, L, V]`` for a collated batch (padded: attention mask; packed: position ids)."""
        return self.language_model.head(self.hidden_states(batch))

    def supervised_logits(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """``(logits [S, V], targets [S], sample index [S])`` at the ``S`` positions whose next token is learned;
        the vocabulary projection skips every other position."""
        hidden = self.hidden_states(batch)  # [R, L, D]
        mask = supervised(batch.labels)  # [R, L-1]
        logits = self.language_model.head(hidden[:, :-1][mask])  # [S, V]
        return logits, batch.labels[:, 1:][mask], batch.sample_index[:, 1:][mask]

    @torch.no_grad()
    def generate(self, batch: Batch, **overrides) -> list[str]:
        """Decoded replies of a left-padded prompt batch, with the model's ``generation`` settings (``overrides``
        replace single ``transformers`` ``generate`` arguments, e.g. ``num_beams=3``, ``stop_strings=["\\n"]``).

        The images are encoded once per call (every family: the visual features reach each decoding step with the
        KV cache); each reply is cut before its first stop string and stripped. One reply per prompt row, or
        ``num_return_sequences`` consecutive replies per row."""
        inputs = self.inputs(batch)
        settings = {**self.generation.kwargs(), **overrides}
        new = self.language_model.generate(
            inputs.embeds, batch.attention_mask, layer_inputs=inputs.layer_inputs, **settings
        )
        texts = self.language_model.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [cut_at_stop(text, settings.get("stop_strings")).strip() for text in texts]

    @torch.no_grad()
    def option_loglikelihoods(self, context: str, options: list[str], per_token: bool = False) -> Tensor:
        """``[K]`` log-likelihood of each of the ``K`` options as the reply to ``context`` (text only, rendered by
        the chat format as a user turn and its answer): the sum of the log-probabilities of the option's tokens and
        the end-of-reply marker, or their mean per token (``per_token``). The argmax is the model's choice; the
        same figures :class:`~lit_mllm.eval.choice.ChoiceAccuracy` reads from an evaluation step's logits."""
        processor = self.processor()
        samples = choice_samples("options", context, options, 0)
        batch = collate([processor(s) for s in samples], processor.tokenizer.pad_token_id).to(self.device)
        logits, target, which = self.supervised_logits(batch)  # [S, V], [S], [S]
        sums, tokens = sum_by_sample(logits, target, which, len(samples))
        return sums / tokens if per_token else sums

    def _needs_generation(self) -> bool:
        return any(m.needs_generation for m in self.split_metrics["val"].values())

    def describe(self) -> dict[str, int | str]:
        """The base's figures (stage, parameters per part) and the image tokens and connector FLOPs per image."""
        facts = super().describe()
        facts["image_tokens"] = self.tokens_per_image
        facts["connector_flops_per_image"] = connector_flops(self.connector, self.vision_tower.num_features)
        return facts

    # -- the feature cache: the tower's digest taken afresh per run, entries written at epoch ends, the log line --
    def _start_run(self) -> None:
        self._tower_digest = None

    def on_validation_start(self) -> None:
        if self.trainer.state.fn != "fit":  # a fit's validations share the fit's digest
            self._start_run()

    def on_test_start(self) -> None:
        self._start_run()

    def on_predict_start(self) -> None:
        self._start_run()

    def on_train_epoch_end(self) -> None:
        if self.feature_cache is None:
            return
        self.feature_cache.flush()
        counts = self.feature_cache.take_epoch()
        self.log("data/feature_cache_served", counts.served)
        rank_zero_info(f"epoch {self.current_epoch}: feature cache served {counts} (rank 0)")

    def teardown(self, stage: str) -> None:
        if self.feature_cache is None:
            return
        self.feature_cache.flush()
        counts = self.feature_cache.run
        if counts.hits + counts.misses == 0:
            verdict = "was not used"
        else:
            verdict = (
                "served" if counts.misses == 0 else "did not serve" if counts.hits == 0 else "partly served"
            )
        rank_zero_info(
            f"feature cache {verdict} the run: {counts} so far (rank 0); {self.feature_cache.describe()}"
        )

    def on_fit_start(self) -> None:
        self._start_run()
        super().on_fit_start()

    # -- steps ------------------------------------------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        if not len(batch):  # every sample of the batch was bad and skipped (counted by the DataModule)
            return None
        logits, target, which = self.supervised_logits(batch)
        losses = token_losses(logits, target, batch.ids)  # [S]
        loss = losses.mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at step {self.global_step} on samples {batch.ids}; lower the "
                "learning rate, check these samples, or use bf16-mixed instead of fp16"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        self._log_sources(batch, losses.detach(), which)
        return loss

    def _log_sources(self, batch: Batch, losses: Tensor, which: Tensor) -> None:
        """``train/loss/<source>``: the mean over the source's supervised tokens in the batch."""
        names = sorted(set(batch.sources))
        if names == [""]:  # samples not drawn from named sources
            return
        sums, counts = sums_by_source(losses, which, batch.sources, names)
        for k, name in enumerate(names):
            if name:
                self.log(
                    f"train/loss/{name}",
                    sums[k] / counts[k].clamp(min=1),
                    batch_size=batch.sources.count(name),
                )

    def _eval_step(self, batch: Batch, split: str) -> None:
        if not len(batch):  # every sample of the batch was bad and skipped
            return
        logits = self(batch)
        losses = lm_token_losses(logits, batch.labels, batch.ids)  # [S]
        self.split_losses[split].update(losses.mean(), weight=len(losses))
        self.log(f"{split}/loss", self.split_losses[split], prog_bar=True, batch_size=len(batch))
        if split in self.task_losses:  # the mean over each task's supervised tokens, logged in _log_metrics
            tasks = list(self.task_losses[split])
            of_token = batch.sample_index[:, 1:][supervised(batch.labels)]  # each supervised token's sample
            sums, counts = sums_by_source(losses, of_token, batch.sources, tasks)
            for k, task in enumerate(tasks):
                if counts[k]:
                    self.task_losses[split][task].update(sums[k] / counts[k], weight=counts[k])
        outputs = EvalOutputs(batch, logits, self._generations(batch, split))
        for metric in self.split_metrics[split].values():
            _update(metric, outputs)
        for task, metrics in self.task_metrics[split].items() if split in self.task_metrics else ():
            rows = [i for i, source in enumerate(batch.sources) if source == task]
            if rows:
                for metric in metrics.values():
                    metric.update_from(outputs.select(rows))

    def _generations(self, batch: Batch, split: str) -> list[str | None] | None:
        """The generated reply of every sample some generation metric of the split scores (its ``tasks``); None
        for the other samples, and no list at all when no metric needs replies."""
        wanted = [m for m in self.split_metrics[split].values() if m.needs_generation]
        if batch.generation is None or not wanted:
            return None
        rows = [i for i, source in enumerate(batch.sources) if any(m.scores(source) for m in wanted)]
        if len(rows) == len(batch):
            return self.generate(batch.generation)
        out: list[str | None] = [None] * len(batch)  # read by no metric: each sees only its tasks' rows
        if rows:
            for row, reply in zip(rows, self.generate(batch.select(rows).generation), strict=True):
                out[row] = reply
        return out

    def setup(self, stage: str) -> None:
        """Per-task metrics: where a split has several sources, its loss over each source's supervised tokens and a
        copy of every metric that scores the source (its ``tasks``), logged as ``<split>/<task>/loss`` and
        ``<split>/<task>/<name>`` beside the split's overall ``<split>/<name>``. A metric naming a task the split
        lacks is an error."""
        splits = getattr(self.trainer.datamodule, "splits", None) or {}
        evaluated = {"fit": ("val",), "validate": ("val",), "test": ("test",)}.get(stage, ())
        for split, key in (("val", "validate"), ("test", "test")):
            tasks = list(splits.get(key) or {})
            if split in evaluated and tasks:
                for name, metric in self.split_metrics[split].items():
                    unknown = [t for t in metric.tasks or () if t not in tasks]
                    if unknown:
                        raise ValueError(
                            f"metric {name!r} scores tasks {unknown} that the {split} split does not have; its "
                            f"sources are {tasks} (data.init_args.{key.replace('validate', 'val')})"
                        )
            if len(tasks) > 1 and (split not in self.task_losses or list(self.task_losses[split]) != tasks):
                self.task_losses[split] = nn.ModuleDict({task: MeanMetric() for task in tasks})
            if len(tasks) > 1 and split not in self.task_metrics:
                self.task_metrics[split] = nn.ModuleDict(
                    {
                        task: nn.ModuleDict(
                            {n: m.clone() for n, m in self.split_metrics[split].items() if m.scores(task)}
                        )
                        for task in tasks
                    }
                )

    def _log_metrics(self, split: str) -> None:
        """Compute, log and reset the split's metrics (every rank computes: their states synchronise)."""
        groups = [("", self.split_metrics[split])]
        if split in self.task_losses:  # computed on every rank even where a rank met none of a task's samples
            groups += [(f"{task}/", {"loss": loss}) for task, loss in self.task_losses[split].items()]
        if split in self.task_metrics:
            groups += [(f"{task}/", metrics) for task, metrics in self.task_metrics[split].items()]
        with warnings.catch_warnings():  # a task a rank never met is computed from its empty state
            warnings.filterwarnings("ignore", message=".*compute.*before the.*update", category=UserWarning)
            for prefix, metrics in groups:
                for name, metric in metrics.items():
                    value = metric.compute()
                    values = value if isinstance(value, dict) else {"": value}
                    for key, v in values.items():
                        self.log(
                            f"{split}/{prefix}{name}" + (f"/{key}" if key else ""),
                            v,
                            prog_bar=not prefix and not key,
                        )
                    metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")
        if self.feature_cache is not None:  # write the features computed for validation images
            self.feature_cache.flush()

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: Batch, batch_idx: int) -> list[dict]:
        if not len(batch):
            return []
        answers = self.generate(batch)
        references = batch.references or [[] for _ in batch.ids]
        prompts = batch.prompts or ["" for _ in batch.ids]
        return [
            {"id": i, "prompt": p, "answer": a, "references": r}
            for i, p, a, r in zip(batch.ids, prompts, answers, references)
        ]
