"""Training stages: which named parts of a model train. Everything else is frozen, runs without autograd
where it can, and stays in eval mode (dropout off, norms fixed) even when Lightning calls ``.train()``.

LLaVA's recipe is two stages: ``align`` (connector only, on captions) then ``finetune`` (connector + LLM,
on instructions). The freeze is asserted (freeze all -> check nothing trains -> unfreeze the named parts)
and printed as a table of parameters per part.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


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

    def trains(self, part: str) -> bool:
        """Whether any parameter of ``part`` trains in this stage."""
        return part in self.trainable or self.train_last_blocks.get(part, 0) > 0


def apply_stage(parts: dict[str, nn.Module], stage: Stage) -> None:
    """Freeze every part, then unfreeze ``stage.trainable`` and the ``train_last_blocks``; set train/eval modes."""
    unknown = sorted((set(stage.trainable) | set(stage.train_last_blocks) | set(stage.lr_scale)) - set(parts))
    if unknown:
        raise ValueError(
            f"stage {stage.name!r} names unknown part(s) {unknown}; valid parts: {sorted(parts)}"
        )
    both = sorted(set(stage.trainable) & set(stage.train_last_blocks))
    if both:
        raise ValueError(
            f"stage {stage.name!r} lists {both} in both trainable (the whole part) and train_last_blocks (its last "
            "blocks only); keep each part in one of them"
        )
    for module in parts.values():
        module.requires_grad_(False)
    leaked = [n for n, m in parts.items() for p in m.parameters() if p.requires_grad]
    assert not leaked, f"parameters still trainable after freezing: {leaked}"
    for name in stage.trainable:
        parts[name].requires_grad_(True)
    for block in _partly_trained_blocks(parts, stage):
        block.requires_grad_(True)
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
    are in train mode."""
    for name, module in parts.items():
        module.train(name in stage.trainable)
    for block in _partly_trained_blocks(parts, stage):
        block.train(True)


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
    """A text table: part, parameters, trainable parameters, train/eval mode."""
    rows = [("part", "parameters", "trainable", "mode")]
    totals = [0, 0]
    for name, module in parts.items():
        total, trainable = count(module)
        totals[0] += total
        totals[1] += trainable
        mode = (
            "train" if module.training else "partial" if any(m.training for m in module.modules()) else "eval"
        )
        rows.append((name, f"{total:,}", f"{trainable:,}", mode))
    rows.append(("total", f"{totals[0]:,}", f"{totals[1]:,}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    trains = list(stage.trainable) + [f"last {n} blocks of {p}" for p, n in stage.train_last_blocks.items()]
    lines = [f"stage {stage.name!r}: trains {', '.join(trains) or 'nothing'}"]
    for i, row in enumerate(rows):
        lines.append(
            "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths)))
        )
        if i == 0 or i == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
