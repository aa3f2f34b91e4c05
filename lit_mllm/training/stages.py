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


def apply_stage(parts: dict[str, nn.Module], stage: Stage) -> None:
    """Freeze every part, then unfreeze ``stage.trainable``; frozen parts are put in eval mode."""
    unknown = sorted(set(stage.trainable) - set(parts))
    if unknown:
        raise ValueError(
            f"stage {stage.name!r} names unknown part(s) {unknown}; valid parts: {sorted(parts)}"
        )
    for module in parts.values():
        module.requires_grad_(False)
    leaked = [n for n, m in parts.items() for p in m.parameters() if p.requires_grad]
    assert not leaked, f"parameters still trainable after freezing: {leaked}"
    for name in stage.trainable:
        parts[name].requires_grad_(True)
    for name, module in parts.items():
        module.train(name in stage.trainable)


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
        rows.append((name, f"{total:,}", f"{trainable:,}", "train" if module.training else "eval"))
    rows.append(("total", f"{totals[0]:,}", f"{totals[1]:,}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"stage {stage.name!r}: trains {', '.join(stage.trainable) or 'nothing'}"]
    for i, row in enumerate(rows):
        lines.append(
            "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths)))
        )
        if i == 0 or i == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
