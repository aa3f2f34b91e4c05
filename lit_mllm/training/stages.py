"""Training stages: which named parts of a model train. Everything else is frozen, runs without autograd
where it can, and stays in eval mode (dropout off, norms fixed) even when Lightning calls ``.train()``.

LLaVA's recipe is two stages: ``align`` (connector only, on captions) then ``finetune`` (connector + LLM,
on instructions). The freeze is asserted (freeze all -> check nothing trains -> unfreeze the named parts)
and printed as a table of parameters per part.

A stage can also put LoRA adapters on a part (:class:`~lit_mllm.training.peft.LoRA`): the part stays frozen but
for its adapters, which train (the part then runs with autograd and its adapter dropout in train mode). In YAML::

    stage:
      name: finetune
      trainable: [connector]
      lora: {language_model: {r: 64, alpha: 16, dropout: 0.05, target_modules: [q_proj, v_proj]}}

Several stages can follow each other in one run (:class:`StageSchedule`): the model re-freezes at each milestone
and a new optimizer is built over the new stage's parameters. ``class_path`` names the type (needed when the
schedule replaces a single stage set by an earlier config; ``{stages: [...]}`` alone works otherwise)::

    stage:
      class_path: lit_mllm.training.stages.StageSchedule
      init_args:
        stages:
          - {at_step: 0, stage: {name: align, trainable: [connector]}}
          - {at_step: 500, stage: {name: finetune, trainable: [connector, language_model]}}
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lit_mllm.training.peft import LoRA, adapter_modules, adapter_parameter_count, add_lora


@dataclass
class Stage:
    """A named set of trainable parts."""

    name: str = "finetune"
    """Label for logs and the run directory (``align``, ``finetune``, ...)."""
    trainable: list[str] = field(default_factory=lambda: ["connector", "language_model"])
    """Parts that train; the rest are frozen. Valid names are the family's parts (e.g. ``vision_tower``,
    ``connector``, ``language_model``)."""
    train_last_blocks: dict[str, int] = field(default_factory=dict)
    """Parts of which only the last N transformer blocks train, the rest of the part frozen (POINTS trains the
    last 3 blocks of its general ViT: ``{vision_tower: 3}``). A part named here must not also be in ``trainable``."""

    lr_scale: dict[str, float] = field(default_factory=dict)
    """Learning-rate multiplier per part (default 1): CogVLM trains its LLM at ``{language_model: 0.1}``."""
    lora: dict[str, LoRA] = field(default_factory=dict)
    """LoRA adapters per part; of a part named here only the adapters train, unless the part is also in
    ``trainable`` (then all of it). MiniGPT-v2: ``{language_model: {r: 64, alpha: 16, dropout: 0.05,
    target_modules: [q_proj, v_proj]}}``. ``quantize_base: nf4`` holds the part's frozen weights in 4 bits
    (QLoRA; needs bitsandbytes and a CUDA GPU)."""

    def trains(self, part: str) -> bool:
        """Whether any parameter of ``part`` trains in this stage."""
        return part in self.trainable or self.train_last_blocks.get(part, 0) > 0 or part in self.lora

    def check(self, parts: dict[str, nn.Module] | list[str]) -> None:
        """Raise ``ValueError`` naming what is wrong when this stage does not fit a family's parts."""
        unknown = sorted(
            (set(self.trainable) | set(self.train_last_blocks) | set(self.lr_scale) | set(self.lora))
            - set(parts)
        )
        if unknown:
            raise ValueError(
                f"stage {self.name!r} names unknown part(s) {unknown}; valid parts: {sorted(parts)}"
            )
        both = sorted(set(self.trainable) & set(self.train_last_blocks))
        if both:
            raise ValueError(
                f"stage {self.name!r} lists {both} in both trainable (the whole part) and train_last_blocks (its "
                "last blocks only); keep each part in one of them"
            )
        quantized = sorted(
            p
            for p, spec in self.lora.items()
            if spec.quantize_base and (p in self.trainable or p in self.train_last_blocks)
        )
        if quantized:
            raise ValueError(
                f"stage {self.name!r} quantizes the base weights of {quantized} to 4 bits (lora quantize_base) and "
                "also trains them (trainable / train_last_blocks); 4-bit weights cannot train: drop one of the two"
            )

    def describe(self) -> str:
        """What trains, in words: ``connector, LoRA r=64 on q_proj, v_proj of language_model``."""
        trains = list(self.trainable) + [f"last {n} blocks of {p}" for p, n in self.train_last_blocks.items()]
        trains += [f"{spec.describe()} of {p}" for p, spec in self.lora.items() if p not in self.trainable]
        return ", ".join(trains) or "nothing"


@dataclass
class Milestone:
    """A stage and the optimizer step it starts at."""

    at_step: int
    """First optimizer step (``trainer.global_step``, counted from 0) of this stage; the first milestone is at 0."""
    stage: Stage
    """What trains from ``at_step`` until the next milestone."""


@dataclass
class StageSchedule:
    """Stages that follow each other in one run, switched at optimizer-step milestones. At a milestone the model
    re-freezes for the new stage, a new optimizer (and learning-rate schedule, spanning the new stage's steps) is
    built over exactly its trainable parameters, and the table of parameters is printed again.

    LoRA adapters that any stage declares are injected when the model is built (so checkpoints of any stage load
    into it); they train only in the stages that declare them. A part's LoRA must be the same in every stage."""

    stages: list[Milestone]
    """The stages in order: ``[{at_step: 0, stage: {name: align, ...}}, {at_step: 500, stage: {...}}]``."""

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("StageSchedule.stages is empty; give at least one {at_step: 0, stage: ...}")
        steps = [m.at_step for m in self.stages]
        if steps[0] != 0 or any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(
                f"StageSchedule milestones at steps {steps}: the first must be at step 0 and each later one at a "
                "larger step"
            )
        self.adapters()  # conflicting LoRA for one part is an error as soon as the schedule is built

    def index_at(self, step: int) -> int:
        """Index of the stage that trains optimizer step ``step``."""
        return max(i for i, m in enumerate(self.stages) if m.at_step <= step)

    def steps_of(self, index: int, total_steps: int) -> int:
        """Optimizer steps stage ``index`` lasts in a run of ``total_steps`` (at least 1)."""
        end = self.stages[index + 1].at_step if index + 1 < len(self.stages) else total_steps
        return max(1, end - self.stages[index].at_step)

    def adapters(self) -> dict[str, LoRA]:
        """The LoRA of each part that any stage adapts."""
        found: dict[str, tuple[str, LoRA]] = {}
        for m in self.stages:
            for part, spec in m.stage.lora.items():
                first = found.setdefault(part, (m.stage.name, spec))
                if first[1] != spec:
                    raise ValueError(
                        f"stages {first[0]!r} and {m.stage.name!r} give {part} different LoRA adapters ({first[1]} vs "
                        f"{spec}); a part keeps one adapter for the whole run: give it the same LoRA in every stage"
                    )
        return {part: spec for part, (_, spec) in found.items()}

    def describe(self) -> str:
        return " -> ".join(f"{m.stage.name} (from step {m.at_step})" for m in self.stages)


def apply_stage(parts: dict[str, nn.Module], stage: Stage) -> None:
    """Inject the stage's LoRA adapters (if not there yet), freeze every part, then unfreeze ``stage.trainable``,
    the ``train_last_blocks`` and the adapters of ``stage.lora``; set train/eval modes."""
    stage.check(parts)
    for name, spec in stage.lora.items():
        add_lora(parts[name], spec, name)
    for module in parts.values():
        module.requires_grad_(False)
    leaked = [n for n, m in parts.items() for p in m.parameters() if p.requires_grad]
    assert not leaked, f"parameters still trainable after freezing: {leaked}"
    for name in stage.trainable:
        parts[name].requires_grad_(True)
    for block in _partly_trained_blocks(parts, stage):
        block.requires_grad_(True)
    for name in stage.lora:
        for module in adapter_modules(parts[name]):
            module.requires_grad_(True)
    set_modes(parts, stage)


def _partly_trained_blocks(parts: dict[str, nn.Module], stage: Stage) -> list[nn.Module]:
    blocks = []
    for name, n in stage.train_last_blocks.items():
        if not hasattr(parts[name], "last_blocks"):
            raise ValueError(f"stage {stage.name!r}: part {name!r} has no transformer blocks to unfreeze")
        blocks += parts[name].last_blocks(n)
    return blocks


def set_modes(parts: dict[str, nn.Module], stage: Stage) -> None:
    """Trained parts in train mode, frozen parts in eval mode; of a partly trained part only its trained blocks
    (or its adapters and their dropout) are in train mode."""
    for name, module in parts.items():
        module.train(name in stage.trainable)
    for block in _partly_trained_blocks(parts, stage):
        block.train(True)
    for name in stage.lora:
        for module in adapter_modules(parts[name]):
            module.train(True)


WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def state_name(name: str) -> str:
    """A parameter's name as state dicts write it: FSDP / activation-checkpoint / compile wrapper prefixes removed."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def trainable_names(module: nn.Module, trains: bool = True) -> set[str]:
    """State-dict names of the parameters of ``module`` that train (``trains=False``: that are frozen)."""
    return {state_name(name) for name, p in module.named_parameters() if p.requires_grad == trains}


def param_groups(parts: dict[str, nn.Module], stage: Stage) -> list[dict]:
    """Optimizer parameter groups of the trainable parameters: one per (part, decay) pair, with the part's
    ``lr_scale``; norms, biases and embeddings get ``weight_decay=0``, the others the optimizer's configured
    weight decay. Every trainable parameter is in exactly one group; shared parameters once."""
    groups: dict[tuple[str, bool], dict] = {}
    seen: set[int] = set()
    for name, part in parts.items():
        for module in part.modules():
            for param in module.parameters(recurse=False):
                if not param.requires_grad or id(param) in seen:
                    continue
                seen.add(id(param))
                decay = param.ndim >= 2 and not isinstance(module, nn.Embedding)
                group = groups.setdefault(
                    (name, decay), {"params": [], "part": name, "lr_scale": stage.lr_scale.get(name, 1.0)}
                )
                if not decay:
                    group["weight_decay"] = 0.0
                group["params"].append(param)
    return list(groups.values())


def count(module: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; shared tensors counted once."""
    seen, total, trainable = set(), 0, 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def trainable_table(parts: dict[str, nn.Module], stage: Stage) -> str:
    """A text table: part, parameters, trainable parameters, train/eval mode; with a ``lora`` column (adapter
    weights, included in the parameters) when a part holds adapters."""
    adapters = {name: adapter_parameter_count(module) for name, module in parts.items()}
    with_lora = any(adapters.values())
    header = ("part", "parameters", "trainable", *(("lora",) if with_lora else ()), "mode")
    rows = [header]
    totals = [0, 0, 0]
    for name, module in parts.items():
        total, trainable = count(module)
        totals = [totals[0] + total, totals[1] + trainable, totals[2] + adapters[name]]
        mode = (
            "train" if module.training else "partial" if any(m.training for m in module.modules()) else "eval"
        )
        lora = (f"{adapters[name]:,}",) if with_lora else ()
        rows.append((name, f"{total:,}", f"{trainable:,}", *lora, mode))
    rows.append(
        ("total", f"{totals[0]:,}", f"{totals[1]:,}", *((f"{totals[2]:,}",) if with_lora else ()), "")
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [f"stage {stage.name!r}: trains {stage.describe()}"]
    for i, row in enumerate(rows):
        lines.append(
            "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths)))
        )
        if i == 0 or i == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
