"""Training stages: which parts of a model train. Everything else is frozen, runs without autograd where it can,
and stays in eval mode (dropout off, norms fixed) even when Lightning calls ``.train()``.

LLaVA's recipe is two stages: ``align`` (connector only, on captions) then ``finetune`` (connector + LLM,
on instructions). The freeze is asserted (freeze all -> check nothing trains -> unfreeze by the rule below)
and printed as a table of parameters per part.

**Parts nest.** A family names its parts (``parts()``: a name -> a module, or a list of modules for a part spread
over several places, e.g. one cross-attention block per decoder layer), and a part may lie inside another (Flamingo's
``xattn`` inside ``language_model``). A stage may also name a module inside a part by a dotted path of child names
(``connector.qformer`` is ``parts["connector"].get_submodule("qformer")``; into a list-valued part the path is
followed in each of its modules); such a name is a part while that stage mentions it. One rule decides everything:

    every parameter and every module belongs to the innermost part that contains it,

and that owner decides whether it trains, its train/eval mode, its optimizer group and learning-rate scale, and the
row of the parameter table that counts it (each parameter is counted once; the table's total is the model's).

- A part trains when the stage lists it in ``trainable``, and only then: a part nested in a trainable part and
  not listed is frozen. ``frozen`` names parts to keep frozen inside a trainable one; MiniGPT-4 trains its
  projection and keeps its Q-Former frozen: ``{trainable: [connector], frozen: [connector.qformer]}``.
- ``lr_scale`` is not inherited by named parts: a nested part not given one trains at 1 (CogVLM:
  ``{trainable: [language_model, visual_expert], lr_scale: {language_model: 0.1}}`` trains its visual experts,
  nested in the LLM, at 1).
- ``train_last_blocks`` and ``lora`` add *derived* parts, the trainable portion of the part they are declared on:
  ``vision_tower[last 3 blocks]`` (those blocks) and ``language_model[LoRA]`` (the adapter weights and their
  dropout). Derived parts train, take the ``lr_scale`` of the part they are declared on, and are made of the
  modules themselves, so they are innermost unless a named part lies inside them. A part in ``trainable`` trains
  whole, adapters included.
- Two names for the same parameters: a dotted name of the stage wins over a derived part, which wins over a family
  part; of two family parts (or two dotted names) the later declared wins. Named parts that share modules without
  one containing the other are refused (``ValueError`` naming both).
- A parameter tied between parts (the same tensor in two places) is counted and grouped once: it trains if any of
  its owners trains, in the group of the first such owner (the family's order of parts).

A LoRA stage in YAML: the part stays frozen but for its adapters, which train (the part then runs with autograd
and its adapter dropout in train mode)::

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

from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from lit_mllm.training.peft import LoRA, adapter_modules, add_lora

Parts = dict[str, nn.Module | list[nn.Module]]
"""A family's parts: each name -> one module, or a list of modules (a part spread over several places)."""


@dataclass
class Stage:
    """A named set of trainable parts (see the module docstring for how nested parts are resolved)."""

    name: str = "finetune"
    """Label for logs and the run directory (``align``, ``finetune``, ...)."""
    trainable: list[str] | None = None
    """Parts that train; every other part is frozen, including a part nested in a trainable one that is not listed
    here. Names are the family's parts (e.g. ``vision_tower``, ``connector``, ``language_model``) or a dotted path
    into one (``connector.proj``). None: the family's default stage (each family module supplies one)."""
    frozen: list[str] = field(default_factory=list)
    """Parts kept frozen inside a trainable one, usually dotted paths: MiniGPT-4 trains ``[connector]`` with
    ``frozen: [connector.qformer]`` (the projection trains, the Q-Former stays frozen, in eval mode)."""
    train_last_blocks: dict[str, int] = field(default_factory=dict)
    """Parts of which only the last N transformer blocks train, the rest of the part frozen (POINTS trains the
    last 3 blocks of its general ViT: ``{vision_tower: 3}``); the blocks are the derived part
    ``vision_tower[last 3 blocks]`` and train at the part's ``lr_scale``. A part named here must not also be in
    ``trainable``."""
    lr_scale: dict[str, float] = field(default_factory=dict)
    """Learning-rate multiplier per part (default 1): CogVLM trains its LLM at ``{language_model: 0.1}``. A nested
    named part does not inherit its parent's (it gets its own entry or 1); the derived parts of ``train_last_blocks``
    and ``lora`` take the scale of the part they are declared on. A dotted name here must name a part the stage
    trains."""
    lora: dict[str, LoRA] = field(default_factory=dict)
    """LoRA adapters per part; of a part named here only the adapters train (the derived part
    ``language_model[LoRA]``, at the part's ``lr_scale``), unless the part is also in ``trainable`` (then all of it).
    MiniGPT-v2: ``{language_model: {r: 64, alpha: 16, dropout: 0.05, target_modules: [q_proj, v_proj]}}``.
    ``quantize_base: nf4`` holds the part's frozen weights in 4 bits (QLoRA; needs bitsandbytes and a CUDA GPU)."""

    def names(self) -> list[str]:
        """Every part name this stage mentions, in order of first mention (trainable, frozen, train_last_blocks,
        lr_scale, lora)."""
        mentioned = [
            *(self.trainable or []),
            *self.frozen,
            *self.train_last_blocks,
            *self.lr_scale,
            *self.lora,
        ]
        return list(dict.fromkeys(mentioned))

    def check(self, parts: Parts | list[str]) -> None:
        """Raise ``ValueError`` naming what is wrong when this stage does not fit a family's parts (given as the
        parts, or only their names: then dotted paths are checked as far as their first name)."""
        self._require_trainable()
        unknown = sorted(n for n in self.names() if n.split(".", 1)[0] not in parts)
        if unknown:
            raise ValueError(
                f"stage {self.name!r} names unknown part(s) {unknown}; valid parts: {sorted(parts)} (or a dotted "
                "path into one, e.g. connector.<child>)"
            )
        if isinstance(parts, dict):
            for name in self.names():
                resolve(parts, name)
        for other, what in (
            (self.train_last_blocks, "train_last_blocks (its last blocks only)"),
            (self.frozen, "frozen"),
        ):
            both = sorted(set(self.trainable) & set(other))
            if both:
                raise ValueError(
                    f"stage {self.name!r} lists {both} in both trainable (the whole part) and {what}; keep each part "
                    "in one of them"
                )
        idle = sorted(
            n
            for n in self.lr_scale
            if "." in n
            and n not in parts
            and n not in self.trainable
            and n not in self.train_last_blocks
            and n not in self.lora
        )
        if idle:
            raise ValueError(
                f"stage {self.name!r} gives lr_scale to {idle}, which it does not train: a part named by a dotted "
                "path is a part of its own and trains only when listed in trainable; add it there"
            )
        quantized = sorted(
            p
            for p, spec in self.lora.items()
            if spec.quantize_base
            and (
                p in self.trainable
                or p in self.train_last_blocks
                or any(n.startswith(p + ".") for n in self.trainable)
            )
        )
        if quantized:
            raise ValueError(
                f"stage {self.name!r} quantizes the base weights of {quantized} to 4 bits (lora quantize_base) and "
                "also trains them (in trainable, whole or by a dotted path, or train_last_blocks); 4-bit weights "
                "cannot train: drop one of the two"
            )

    def describe(self) -> str:
        """What trains, in words: ``connector, LoRA r=64 on q_proj, v_proj of language_model``; frozen parts
        inside trained ones follow (``connector; keeps connector.qformer frozen``)."""
        self._require_trainable()
        trains = list(self.trainable) + [f"last {n} blocks of {p}" for p, n in self.train_last_blocks.items()]
        trains += [f"{spec.describe()} of {p}" for p, spec in self.lora.items() if p not in self.trainable]
        keeps = f"; keeps {', '.join(self.frozen)} frozen" if self.frozen else ""
        return (", ".join(trains) or "nothing") + keeps

    def _require_trainable(self) -> None:
        if self.trainable is None:
            raise ValueError(
                f"stage {self.name!r} has trainable=None (the family's default stage), which the family module "
                "resolves before the stage is used; give trainable explicitly, e.g. [connector, language_model]"
            )


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


# -- parts and their owners ---------------------------------------------------------------------------------------
def _modules_of(value: nn.Module | list[nn.Module], name: str) -> list[nn.Module]:
    modules = [value] if isinstance(value, nn.Module) else list(value)
    if not modules or not all(isinstance(m, nn.Module) for m in modules):
        raise ValueError(
            f"part {name!r} is {type(value).__name__}; a part is an nn.Module or a non-empty list of them"
        )
    return modules


def resolve(parts: Parts, name: str) -> list[nn.Module]:
    """The modules of part ``name``: a family part, or a dotted path of child names into one (followed in each
    module of a list-valued part). ``ValueError`` naming the valid parts, and for a path the children available
    where it fails, when it names nothing."""
    if name in parts:
        return _modules_of(parts[name], name)
    head, _, path = name.partition(".")
    if head not in parts or not path:
        raise ValueError(
            f"{name!r} names no part; valid parts: {sorted(parts)}, or a dotted path of child modules into one "
            "(e.g. connector.<child>)"
        )
    found = []
    roots = _modules_of(parts[head], head)
    for i, module in enumerate(roots):
        walked = head if len(roots) == 1 else f"{head}[{i}]"
        for child in path.split("."):
            children = dict(module.named_children())
            if child not in children:
                raise ValueError(
                    f"{name!r} names nothing: {walked} ({type(module).__name__}) has no child module {child!r}; "
                    f"its children are {sorted(children)}. Valid parts: {sorted(parts)}, or a dotted path into one"
                )
            module, walked = children[child], f"{walked}.{child}"
        found.append(module)
    return found


@dataclass(eq=False)
class Part:
    """One part of a stage's plan: its modules and what the stage says of them."""

    name: str
    """Family name, dotted path, or derived name (``vision_tower[last 3 blocks]``, ``language_model[LoRA]``)."""
    modules: list[nn.Module]
    """Its modules; everything inside them belongs to it unless a part further in claims it."""
    trains: bool
    """Whether the parameters it owns train (and its modules run in train mode)."""
    lr_scale: float
    """Learning-rate multiplier of the parameters it owns."""
    kind: str
    """``family`` (declared by the family), ``stage`` (a dotted path the stage names) or ``derived`` (the last blocks
    or LoRA adapters of a part)."""
    rank: int
    """Precedence between parts made of the same modules or parameters, the higher wins: a dotted name over a
    derived part over a family part; within each kind, the later declared."""


class Ownership:
    """Which part owns each module and parameter under a stage: the innermost part containing it (module docstring).

    Built from the parts' modules alone (no flag is read or set), so the tests and :func:`apply_stage` agree."""

    def __init__(self, parts: Parts, stage: Stage) -> None:
        stage.check(parts)
        self.parts = self._declare(parts, stage)  # display order: family, dotted, derived
        named = [p for p in self.parts if p.kind != "derived"]
        self.family = [p for p in self.parts if p.kind == "family"]
        self._subtree = {id(p): {id(m) for root in p.modules for m in root.modules()} for p in self.parts}
        for i, a in enumerate(named):
            for b in named[i + 1 :]:
                sa, sb = self._subtree[id(a)], self._subtree[id(b)]
                if sa & sb and not (sa <= sb or sb <= sa):
                    raise ValueError(
                        f"stage {stage.name!r}: parts {a.name!r} and {b.name!r} share some modules but neither "
                        "contains the other; a module must belong to one innermost part: name parts that nest"
                    )
        self._parent_of: dict[int, nn.Module] = {}
        for part in self.parts:
            for root in part.modules:
                for module in root.modules():
                    for child in module.children():
                        self._parent_of[id(child)] = module
        self._roots: dict[int, list[Part]] = {}
        for part in self.parts:
            for root in part.modules:
                self._roots.setdefault(id(root), []).append(part)
        # outer to inner (and, for one module in two parts, the winner last): inner parts overwrite outer ones
        self.order = sorted(
            ((part, root) for part in self.parts for root in part.modules),
            key=lambda pr: (self._depth(pr[1]), pr[0].rank),
        )
        self.owner: dict[int, Part] = {}
        for part, root in self.order:
            for module in root.modules():
                self.owner[id(module)] = part
        self._merge_equal_parts()
        self.modules: list[nn.Module] = []  # every module under a family part, once, in the family's order
        self.params: dict[int, tuple[nn.Parameter, nn.Module, Part]] = {}  # id -> (param, holder, owner)
        owners: dict[int, list[Part]] = {}
        seen: set[int] = set()
        for part in self.family:
            for root in part.modules:
                for module in root.modules():
                    if id(module) in seen:
                        continue
                    seen.add(id(module))
                    self.modules.append(module)
                    for param in module.parameters(recurse=False):
                        self.params.setdefault(id(param), (param, module, self.owner[id(module)]))
                        found = owners.setdefault(id(param), [])
                        if self.owner[id(module)] not in found:
                            found.append(self.owner[id(module)])
        for key, found in owners.items():  # tied: trains if any owner does, grouped with the first that does
            if len(found) > 1:
                param, holder, _ = self.params[key]
                self.params[key] = (param, holder, next((o for o in found if o.trains), found[0]))

    @staticmethod
    def _declare(parts: Parts, stage: Stage) -> list[Part]:
        lr = {name: float(scale) for name, scale in stage.lr_scale.items()}
        declared = [
            Part(name, _modules_of(value, name), name in stage.trainable, lr.get(name, 1.0), "family", i)
            for i, (name, value) in enumerate(parts.items())
        ]
        dotted = [n for n in stage.names() if n not in parts]
        ranks = len(parts) + len(stage.train_last_blocks) + len(stage.lora)  # dotted names over derived parts
        declared += [
            Part(n, resolve(parts, n), n in stage.trainable, lr.get(n, 1.0), "stage", ranks + i)
            for i, n in enumerate(dotted)
        ]
        for name, n in stage.train_last_blocks.items():
            blocks = []
            for module in resolve(parts, name):
                if not hasattr(module, "last_blocks"):
                    raise ValueError(
                        f"stage {stage.name!r}: part {name!r} ({type(module).__name__}) has no transformer blocks "
                        "to unfreeze (train_last_blocks needs a vision tower's last_blocks)"
                    )
                blocks += module.last_blocks(n)
            if blocks:
                rank = len(parts) + sum(p.kind == "derived" for p in declared)
                declared.append(
                    Part(f"{name}[last {n} blocks]", blocks, True, lr.get(name, 1.0), "derived", rank)
                )
        for name in stage.lora:
            adapters = [m for module in resolve(parts, name) for m in adapter_modules(module)]
            if adapters:  # none before apply_stage injects them
                rank = len(parts) + sum(p.kind == "derived" for p in declared)
                declared.append(Part(f"{name}[LoRA]", adapters, True, lr.get(name, 1.0), "derived", rank))
        return declared

    def _depth(self, module: nn.Module) -> int:
        """Number of part roots strictly above ``module``."""
        depth, seen = 0, {id(module)}
        while id(module) in self._parent_of:
            module = self._parent_of[id(module)]
            if id(module) in seen:  # a module shared in a cycle; cannot happen in a tree
                break
            seen.add(id(module))
            depth += id(module) in self._roots
        return depth

    def _merge_equal_parts(self) -> None:
        """Parts holding exactly the same parameters (a wrapper and its only child, say): the highest rank owns
        what any of them owned."""
        by_params: dict[frozenset[int], list[Part]] = {}
        for part in self.parts:
            key = frozenset(id(p) for root in part.modules for p in root.parameters())
            if key:
                by_params.setdefault(key, []).append(part)
        for same in by_params.values():
            if len(same) > 1:
                winner = max(same, key=lambda p: p.rank)
                for key, owner in self.owner.items():
                    if owner in same:
                        self.owner[key] = winner

    def parent(self, part: Part) -> Part | None:
        """The innermost other part whose modules contain all of ``part``'s (for the table's indentation); of parts
        made of the same modules, the lower ranked sits under the higher."""
        inside = self._subtree[id(part)]

        def holds(outer: Part) -> bool:
            around = self._subtree[id(outer)]
            return outer is not part and inside <= around and (inside != around or outer.rank > part.rank)

        module: nn.Module | None = part.modules[0]
        while module is not None:
            candidates = [p for p in self._roots.get(id(module), []) if holds(p)]
            if candidates:
                return min(candidates, key=lambda p: (len(self._subtree[id(p)]), -p.rank))
            module = self._parent_of.get(id(module))
        return None

    def tree(self) -> Iterator[tuple[int, Part]]:
        """``(depth, part)``, each part followed by the parts nested in it, in the order of :attr:`parts`."""
        parents = {id(p): self.parent(p) for p in self.parts}

        def below(outer: Part | None, depth: int) -> Iterator[tuple[int, Part]]:
            for part in self.parts:
                if parents[id(part)] is outer:
                    yield depth, part
                    yield from below(part, depth + 1)

        return below(None, 0)

    def owned(self, part: Part) -> tuple[list[nn.Module], list[nn.Parameter]]:
        """The modules and parameters ``part`` owns."""
        modules = [m for m in self.modules if self.owner[id(m)] is part]
        return modules, [p for p, _, owner in self.params.values() if owner is part]


# -- applying a stage ---------------------------------------------------------------------------------------------
def apply_stage(parts: Parts, stage: Stage) -> None:
    """Inject the stage's LoRA adapters (if not there yet), freeze every part and check that nothing trains, then
    let each parameter train as its innermost part says (module docstring); set train/eval modes."""
    stage.check(parts)
    for name, spec in stage.lora.items():
        for module in resolve(parts, name):
            add_lora(module, spec, name)
    plan = Ownership(parts, stage)
    for part in plan.family:
        for module in part.modules:
            module.requires_grad_(False)
    leaked = [p.name for p in plan.family for m in p.modules for q in m.parameters() if q.requires_grad]
    assert not leaked, f"parameters still trainable after freezing: {leaked}"
    for param, _, owner in plan.params.values():
        if owner.trains:
            param.requires_grad_(True)
    _set_modes(plan)


def set_modes(parts: Parts, stage: Stage) -> None:
    """Each part's modules in train mode when the part trains and in eval mode when frozen, outer parts first so
    that inner parts override them (a frozen part with trained adapters: only the adapters and their dropout train)."""
    _set_modes(Ownership(parts, stage))


def _set_modes(plan: Ownership) -> None:
    for _, root in plan.order:
        root.train(plan.owner[id(root)].trains)


def part_trains(parts: Parts, name: str) -> bool:
    """Whether any parameter inside part ``name`` (a family part or a dotted path) trains, as :func:`apply_stage`
    set it: a tower runs with autograd when this is true."""
    return any(p.requires_grad for module in resolve(parts, name) for p in module.parameters())


WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def state_name(name: str) -> str:
    """A parameter's name as state dicts write it: FSDP / activation-checkpoint / compile wrapper prefixes removed."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def trainable_names(module: nn.Module, trains: bool = True) -> set[str]:
    """State-dict names of the parameters of ``module`` that train (``trains=False``: that are frozen)."""
    return {state_name(name) for name, p in module.named_parameters() if p.requires_grad == trains}


def param_groups(parts: Parts, stage: Stage) -> list[dict]:
    """Optimizer parameter groups of the trainable parameters: one per (owning part, decay) pair, with the owner's
    name (``part``) and ``lr_scale``; norms, biases and embeddings get ``weight_decay=0``, the others the optimizer's
    configured weight decay. Every trainable parameter is in exactly one group; shared parameters once.

    Each group also has a ``name``, ``<part>`` or ``<part>/no_decay``, which Lightning's ``LearningRateMonitor``
    reads to name its curves (``lr-AdamW/connector``, ``lr-AdamW/connector/no_decay``; else ``pg1``, ``pg2``...)."""
    groups: dict[tuple[str, bool], dict] = {}
    for param, holder, owner in Ownership(parts, stage).params.values():
        if not param.requires_grad:
            continue
        decay = param.ndim >= 2 and not isinstance(holder, nn.Embedding)
        name = owner.name if decay else f"{owner.name}/no_decay"
        group = groups.setdefault(
            (owner.name, decay), {"params": [], "part": owner.name, "name": name, "lr_scale": owner.lr_scale}
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


def part_counts(parts: Parts, stage: Stage) -> dict[str, tuple[int, int]]:
    """(total, trainable) parameters each part owns (its innermost parts' parameters not included), by part name;
    the counts add up to the parameters of all parts, each counted once."""
    plan = Ownership(parts, stage)
    counts = {}
    for part in plan.parts:
        _, params = plan.owned(part)
        counts[part.name] = (
            sum(p.numel() for p in params),
            sum(p.numel() for p in params if p.requires_grad),
        )
    return counts


def trainable_table(parts: Parts, stage: Stage) -> str:
    """A text table: part (nested parts indented under the part holding them), the parameters it owns, how many of
    them train, and its modules' mode (``train``, ``eval`` or ``partial``); a final ``total`` row. Derived parts
    (``language_model[LoRA]``, ``vision_tower[last 3 blocks]``) have rows of their own."""
    plan = Ownership(parts, stage)
    header = ("part", "parameters", "trainable", "mode")
    rows = [header]
    totals = [0, 0]
    for depth, part in plan.tree():
        modules, params = plan.owned(part)
        total, trainable = sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
        totals = [totals[0] + total, totals[1] + trainable]
        training = [m.training for m in modules]
        mode = "train" if training and all(training) else "partial" if any(training) else "eval"
        rows.append(("  " * depth + part.name, f"{total:,}", f"{trainable:,}", mode if modules else "-"))
    rows.append(("total", f"{totals[0]:,}", f"{totals[1]:,}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [f"stage {stage.name!r}: trains {stage.describe()}"]
    for i, row in enumerate(rows):
        lines.append(
            "  ".join(
                c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))
            ).rstrip()
        )
        if i == 0 or i == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
