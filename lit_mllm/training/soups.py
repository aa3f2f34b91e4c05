"""Model soups: checkpoints of one architecture and stage, merged by averaging their weights (Wortsman et al.,
"Model soups", arXiv 2203.05482; POINTS, arXiv 2409.04828, merges models fine-tuned on different instruction sets).

- ``uniform``: the average of every checkpoint.
- ``max``: the single best checkpoint by the selection metric.
- ``greedy``: checkpoints ordered by their own score, best first; the soup starts as the best one, and each next
  checkpoint joins (the soup is the uniform average of its members) only if the soup's score strictly improves.
  The soup returned therefore never scores below its best member on the selection split.

Checkpoints must be compatible (:func:`check_compatible`): the same stage, the same tensor names (the trainable
set: our checkpoints hold trainable weights only), shapes and dtypes; the first difference is named. Averages are
accumulated in float64 and cast back to each tensor's dtype, so the average of identical checkpoints is that
checkpoint, bit for bit. Integer tensors (counters, index buffers) are not averaged: they must be equal.

Scoring is the caller's: a function from a state to the selection metric (``lit-mllm soup`` loads it into the
config's model and validates it, as ``lit-mllm evaluate`` does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from lit_mllm.training.checkpoints import WeightsMismatch, atomic_save, read_weights

Method = Literal["uniform", "max", "greedy"]
METHODS: tuple[str, ...] = Method.__args__
State = dict[str, Tensor]


class SoupMismatch(WeightsMismatch):
    """Checkpoints that cannot be averaged: another stage, tensor set, shape or dtype."""


@dataclass
class Ingredient:
    """A checkpoint to merge: its tensors and the stage that wrote it."""

    path: Path
    state: State
    stage: str | None = None

    @classmethod
    def read(cls, path: str | Path) -> Ingredient:
        state, stage = read_weights(path)
        return cls(Path(path), state, stage)


def check_compatible(ingredients: list[Ingredient]) -> None:
    """Raise :class:`SoupMismatch` naming the first difference between the first checkpoint and another: the
    stage, a tensor one holds and the other lacks, a shape or a dtype."""
    if not ingredients:
        raise ValueError("a soup needs at least one checkpoint")
    first = ingredients[0]
    for other in ingredients[1:]:
        pair = f"{first.path} and {other.path}"
        if first.stage != other.stage:
            raise SoupMismatch(
                f"{pair} were written by different stages ({first.stage!r} vs {other.stage!r}), so they train "
                "different parts; merge checkpoints of one stage"
            )
        only = sorted(first.state.keys() ^ other.state.keys())
        if only:
            holder = first.path if only[0] in first.state else other.path
            raise SoupMismatch(
                f"{pair} hold different tensors: {only[0]!r} is only in {holder} ({len(only)} such names); "
                "merge checkpoints of one model and one trainable set"
            )
        for name in sorted(first.state):
            a, b = first.state[name], other.state[name]
            if a.shape != b.shape:
                raise SoupMismatch(
                    f"{pair} differ in the shape of {name!r}: {tuple(a.shape)} vs {tuple(b.shape)}; merge "
                    "checkpoints of one architecture"
                )
            if a.dtype != b.dtype:
                raise SoupMismatch(f"{pair} differ in the dtype of {name!r}: {a.dtype} vs {b.dtype}")


def average(states: list[State]) -> State:
    """The uniform average of compatible states: float tensors averaged in float64 and cast back; other tensors
    must be equal in every state (:class:`SoupMismatch` naming the first that is not)."""
    out = {}
    for name, first in states[0].items():
        if first.is_floating_point() or first.is_complex():
            total = torch.zeros(
                first.shape, dtype=torch.float64 if first.is_floating_point() else torch.complex128
            )
            for state in states:
                total += state[name].to(total.dtype)
            out[name] = (total / len(states)).to(first.dtype)
        else:
            if any(not torch.equal(state[name], first) for state in states[1:]):
                raise SoupMismatch(
                    f"integer tensor {name!r} differs between the checkpoints; it cannot be averaged"
                )
            out[name] = first.clone()
    return out


@dataclass
class Soup:
    """What a soup method gives."""

    method: str
    members: list[Path]
    """Checkpoints averaged into the soup, in the order they joined."""
    state: State
    score: float
    """The soup's selection score."""
    member_scores: dict[str, float] = field(default_factory=dict)
    """Each checkpoint's own score, by path, best first."""
    steps: list[dict] = field(default_factory=list)
    """Each soup tried after the members were scored, in order: ``{"added", "members", "score", "accepted"}``
    (greedy: one per checkpoint after the best; uniform: the one average; max: none)."""


def cook(
    ingredients: list[Ingredient],
    method: Method,
    score: Callable[[State], float],
    higher_is_better: bool = True,
) -> Soup:
    """The soup of ``method`` over compatible ``ingredients`` (checked first), scored by ``score`` (each checkpoint
    once, then each soup tried)."""
    if method not in METHODS:
        raise ValueError(f"soup method must be one of {METHODS}, got {method!r}")
    check_compatible(ingredients)
    scores = [score(i.state) for i in ingredients]
    # best first; ties keep the order given (sorted is stable)
    ranked = sorted(range(len(ingredients)), key=lambda k: -scores[k] if higher_is_better else scores[k])
    member_scores = {str(ingredients[k].path): scores[k] for k in ranked}
    best = ranked[0]
    if method == "max":
        return Soup(
            method, [ingredients[best].path], dict(ingredients[best].state), scores[best], member_scores
        )
    if method == "uniform":
        state = average([i.state for i in ingredients])
        value = score(state)
        paths = [i.path for i in ingredients]
        step = {"added": "all", "members": [str(p) for p in paths], "score": value, "accepted": True}
        return Soup(method, paths, state, value, member_scores, [step])
    members, state, value, steps = [best], dict(ingredients[best].state), scores[best], []
    for k in ranked[1:]:
        trial = average([ingredients[m].state for m in members + [k]])
        trial_score = score(trial)
        accepted = trial_score > value if higher_is_better else trial_score < value
        names = [str(ingredients[m].path) for m in members + [k]]
        steps.append(
            {"added": str(ingredients[k].path), "members": names, "score": trial_score, "accepted": accepted}
        )
        if accepted:
            members, state, value = members + [k], trial, trial_score
    return Soup(method, [ingredients[m].path for m in members], state, value, member_scores, steps)


def save_soup(soup: Soup, stage: str | None, path: str | Path) -> Path:
    """Write the soup as a checkpoint :func:`~lit_mllm.training.checkpoints.load_weights` (and so ``lit-mllm
    evaluate --ckpt_path``) reads: ``state_dict`` and the stage, plus the members it holds."""
    path = Path(path)
    atomic_save(
        {
            "state_dict": soup.state,
            "lit_mllm": {
                "stage": stage,
                "frozen_weights": "rebuilt from the config's sources",
                "soup": {"method": soup.method, "members": [str(p) for p in soup.members]},
            },
        },
        path,
    )
    return path
