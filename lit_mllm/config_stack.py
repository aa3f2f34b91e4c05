"""Stacked ``--config`` files without stale options: a later file that changes a part's class starts that part
from the new class's own defaults.

jsonargparse (checked on 4.53, ``_typehints.discard_init_args_on_class_path_change``) keeps, when a later value
changes a ``class_path``, every earlier ``init_args`` key that the new class also accepts, by design and with no
parser setting to turn it off (only a debug log names the keys it discards). Two places feed it:

- an earlier ``--config`` file: ``--config configs/quickstart.yaml`` (TinyCLIPVision, ``image_size: 64``) then a
  file naming ``HFVisionTower`` gave the Hugging Face tower ``image_size=64``;
- the default class of an option, merged under the parsed config at the end: a config naming
  ``connector: {class_path: CAbstractor}`` got MLPConnector's ``depth=2`` (CAbstractor's own default is 3), and
  ``optimizer: {class_path: torch.optim.SGD}`` got AdamW's ``weight_decay=0.01``.

:func:`stack_configs` rewrites the argument list before LightningCLI parses it, leaving every given argument as it
is (files stay paths, so references inside them resolve as jsonargparse resolves them today) and adding
``--config`` YAML strings around a file where needed:

- before a file that changes the class of a part set by an earlier file: that part set to ``null``, so
  jsonargparse parses the file's part with nothing to carry over (any depth: model, towers, connector, chat
  format, optimizer, scheduler, logger, data, data sources, list items);
- after a file that names a class other than its option's default class: the options the default class has and
  the named class also accepts, pinned to the named class's defaults (unless the file sets them).

``--data FILE`` (a file holding a whole data config, with its ``class_path``) replaces the data config: a
``--config`` string setting ``data`` to ``null`` goes before it, so nothing given for ``data`` earlier (a run
config's sources, its ``generate_if_missing``) carries over. A ``--data`` value that is a YAML string or a file
without ``class_path`` still merges, as jsonargparse does.

One line is printed per option dropped this way, naming the file that set it (or the class whose default it
was). Command-line options (``--model.init_args.connector CAbstractor``) are left to jsonargparse: they are
neither rewritten nor followed, so a class change given as a flag still carries earlier options over.
"""

from __future__ import annotations

import importlib
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any

import yaml

CONFIG_FLAGS = ("--config", "-c")
REPLACING_FLAGS = ("--data",)
"""Options whose file value replaces what earlier arguments gave that option (``--data FILE``)."""
SUBCONFIG_SUFFIXES = (".yaml", ".yml", ".json", ".jsonnet")
_NO_DEFAULT = object()

Key = tuple  # a node's address: dict keys and list indices from the top of the config, e.g. ("model", "init_args")


def stack_configs(args: Sequence[str], log: Callable[[str], None] = print) -> list[str]:
    """The argument list with ``--config`` YAML strings added so that no ``--config`` file inherits a stale option.

    Args:
        args: Command-line arguments as LightningCLI receives them (subcommand included or not).
        log: Where the one line per dropped option goes (``print`` by default; the CLI may pass a rank-zero logger).

    Returns:
        ``args`` with, around each ``--config`` file that changes a part's class, a ``--config`` string that resets
        that part (see the module docstring). Arguments are never removed or reordered.

    Raises:
        ValueError: When a file changes a part's class and an option set earlier has no default in the new class
            (dropping it would leave the option unset; the message names the file to set it in).
    """
    stack = _Stack(log)
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        flag, value = None, None
        if arg in CONFIG_FLAGS and i + 1 < len(args):
            flag, value, i = arg, args[i + 1], i + 2
        elif arg.startswith("--config="):
            flag, value, i = "--config=", arg.split("=", 1)[1], i + 1
        elif (option := _replacing(arg, args[i + 1] if i + 1 < len(args) else None)) is not None:
            key, value, source, node, folder = option
            i += 1 if "=" in arg else 2
            before, after = stack.replace(key, node, source, folder)
            out += ["--config", _yaml({**before, key: None})]
            out += [arg] if "=" in arg else [arg, value]
            if after:
                out += ["--config", _yaml(after)]
            continue
        else:
            out.append(arg)
            i += 1
            continue
        source, node, folder = _read(value)
        before, after = stack.add(node, source, folder) if isinstance(node, dict) else ({}, {})
        if before:
            out += ["--config", _yaml(before)]
        out += [flag + value] if flag.endswith("=") else [flag, value]
        if after:
            out += ["--config", _yaml(after)]
    return out


@dataclass(frozen=True)
class Dropped:
    """One option a ``--config`` file drops from a part, and why."""

    source: str
    """The file that changes the part's class (or names a class other than the option's default class)."""
    node: str
    """Dotted address of the part, e.g. ``model.init_args.connector``."""
    old_class: str
    """The class the option belonged to: the earlier file's, or the option's default class."""
    new_class: str
    key: str
    value: Any
    """The dropped value."""
    origin: str | None
    """The file that set the value; None when it was ``old_class``'s default."""
    default: Any = _NO_DEFAULT
    """``new_class``'s default for the option, when it has the option and one."""
    earlier: bool = True
    """True: an earlier file had set this part to ``old_class``; False: ``old_class`` is the option's default."""

    def __str__(self) -> str:
        new = _short(self.new_class)
        if self.earlier:
            head = (
                f"{self.source} changes {self.node} to {new}: dropped {self.key}={_show(self.value)} set by "
            )
            head += f"{self.origin}"
        else:
            head = f"{self.source} sets {self.node} to {new}: dropped {self.key}={_show(self.value)}, "
            head += f"{_short(self.old_class)}'s default"
        if self.default is _NO_DEFAULT:
            return f"{head} ({new} has no {self.key})"
        return f"{head} (now {new}'s default, {_show(self.default)})"


class _Stack:
    """What the ``--config`` files read so far set (YAML form), which file set each value, and the YAML to add
    around the file being read."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.state: dict = {}
        self.origins: dict[Key, str] = {}
        self.classes: dict[str, _ClassInfo | None] = {}  # class path -> options and defaults, for this call
        self.before: dict = {}
        self.after: dict = {}

    def replace(self, key: str, node: dict, source: str, folder: Path) -> tuple[dict, dict]:
        """Take in a file that replaces the whole option ``key`` (``--data FILE``): one line per option an earlier
        file set there that this file does not set (and that is not the new class's default), then the file is
        read as if nothing came before it. Returns the YAML to apply before and after it (as :meth:`add`)."""
        previous = self.state.pop(key, None)
        if _is_spec(previous):
            info = self._info(node["class_path"])
            defaults = info.defaults if info else {}
            given = node.get("init_args") or {}
            for name, value in (previous.get("init_args") or {}).items():
                at = (key, "init_args", name)
                if isinstance(value, dict) and isinstance(given.get(name), dict) and not _is_spec(value):
                    dropped = [((*at, n), f"{name}.{n}", v) for n, v in value.items() if n not in given[name]]
                elif name not in given and _plain(value) != defaults.get(name, _NO_DEFAULT):
                    dropped = [(at, name, value)]
                else:
                    dropped = []
                for where, what, old in dropped:
                    origin = next((o for k, o in self.origins.items() if k[: len(where)] == where), None)
                    if origin is not None:
                        self.log(f"{source} replaces {key}: dropped {what}={_show(old)} set by {origin}")
        self._forget((key,))
        return self.add({key: node}, source, folder)

    def add(self, node: dict, source: str, folder: Path) -> tuple[dict, dict]:
        """Take in one file's content; return the YAML to apply before it (nulls) and after it (pins)."""
        self.before, self.after = {}, {}
        self._merge(self.state, node, (), source, folder, owner=None)
        return self.before, self.after

    # -- walking a file over the state -----------------------------------------------------------------------------

    def _merge(self, old: dict, new: dict, at: Key, source: str, folder: Path, owner: str | None) -> None:
        """Merge the mapping ``new`` into ``old`` (both at ``at``); ``owner`` is the class whose options they are."""
        for key, value in new.items():
            here = (*at, key)
            value = _subconfig(value, folder)
            previous = old.get(key)
            if _is_spec(value):
                self._merge_part(old, key, value, here, source, folder, owner)
            elif isinstance(value, dict) and owner and _is_mapping_option(owner, key):
                self._merge_mapping(old, key, value, here, source, folder)
            elif isinstance(value, dict) and isinstance(previous, dict):
                if _is_spec(previous) and "init_args" not in value:  # options given without init_args
                    value = {"init_args": value}
                inner = _class(previous) or (owner if key == "init_args" else None)  # whose options these are
                self._merge(previous, value, here, source, folder, owner=inner)
            elif isinstance(value, list) and any(_is_spec(v) for v in value):
                self._merge_list(old, key, value, here, source)
            else:
                self._set(old, key, value, here, source)

    def _merge_part(self, old: dict, key, value: dict, at: Key, source, folder, owner) -> None:
        """A part with a ``class_path``: a class other than the earlier file's starts from nothing (null before
        the file), and options that the option's default class would leak into it are pinned after the file."""
        previous = old.get(key)
        fresh = not (_is_spec(previous) and _same_class(previous["class_path"], value["class_path"]))
        if fresh:
            logged: set[str] = set()
            if _is_spec(previous):
                logged = self._log_earlier(previous, value, at, source)
                _put(self.before, at, None)
            if owner is not None and isinstance(key, str):
                self._pin_default_class(owner, key, value, at, source, logged)
            self._forget(at)
            previous = old[key] = {"class_path": value["class_path"], "init_args": {}}
        self.origins[(*at, "class_path")] = source
        previous["class_path"] = value["class_path"]
        init_args = value.get("init_args")
        if isinstance(init_args, dict):
            if not isinstance(previous.get("init_args"), dict):
                previous["init_args"] = {}
            self._merge(
                previous["init_args"], init_args, (*at, "init_args"), source, folder, value["class_path"]
            )

    def _merge_mapping(self, old: dict, key, value: dict, at: Key, source, folder) -> None:
        """A dict-typed option (``train: {name: source}``): jsonargparse replaces the dict, giving each named
        entry the earlier entry of that name to merge with; a renamed class there is nulled with the whole dict."""
        previous = old.get(key) if isinstance(old.get(key), dict) else {}
        entries = {name: _subconfig(entry, folder) for name, entry in value.items()}
        changed = [
            name
            for name, entry in entries.items()
            if _is_spec(entry)
            and _is_spec(previous.get(name))
            and not _same_class(previous[name]["class_path"], entry["class_path"])
        ]
        kept = {name: previous[name] for name in entries if name in previous and name not in changed}
        if changed:
            partial = [
                name for name, entry in entries.items() if isinstance(entry, dict) and not _is_spec(entry)
            ]
            if partial:
                self.log(
                    f"{source} changes the class of {_dotted((*at, changed[0]))} but gives {', '.join(partial)} "
                    f"without a class_path: options set earlier for {changed[0]} may carry over; give every entry "
                    "of this file's dict a class_path to start them from their defaults"
                )
                kept.update({name: previous[name] for name in changed})
            else:
                for name in changed:
                    self._log_earlier(previous[name], entries[name], (*at, name), source)
                _put(self.before, at, None)
                kept = {}
        self._forget(at)
        old[key] = kept
        self._merge(kept, entries, at, source, folder, owner=None)
        for tree in (
            self.before,
            self.after,
        ):  # a partial dict would replace the whole option: name every entry
            node = _get(tree, at)
            if isinstance(node, dict):
                for name in entries:
                    node.setdefault(name, {"init_args": {}})  # merges with the entry as the file left it

    def _merge_list(self, old: dict, key, value: list, at: Key, source) -> None:
        """A list of parts: jsonargparse merges same-length lists item by item (an item of another class keeps the
        earlier item's options), so such a list is nulled before the file when an item changes class."""
        previous = old.get(key)
        if isinstance(previous, list) and len(previous) == len(value):
            changed = [
                n
                for n, (p, v) in enumerate(zip(previous, value))
                if _is_spec(v) and _is_spec(p) and not _same_class(p["class_path"], v["class_path"])
            ]
            for n in changed:
                self._log_earlier(previous[n], value[n], (*at, n), source)
            if changed:
                _put(self.before, at, None)
        self._set(old, key, value, at, source)

    def _set(self, old: dict, key, value, at: Key, source: str) -> None:
        self._forget(at)
        old[key] = _plain(value)
        self._note(at, value, source)

    # -- what is dropped -------------------------------------------------------------------------------------------

    def _log_earlier(self, previous: dict, value: dict, at: Key, source: str) -> set[str]:
        """One line per option an earlier file set in ``previous`` that the class in ``value`` does not get (after
        the null, the earlier class's own defaults cannot carry over: only options files set are dropped)."""
        old_class, new_class = previous["class_path"], value["class_path"]
        given = value.get("init_args") or {}
        new_info = self._info(new_class)
        logged = set()
        for name, old_value in (previous.get("init_args") or {}).items():
            origin = self.origins.get((*at, "init_args", name))
            if name in given or origin is None:
                continue
            if new_info and name in new_info.required:
                raise ValueError(
                    f"{source} changes {_dotted(at)} to {_short(new_class)}, which has no default for {name}: "
                    f"{name}={_show(old_value)} set by {origin} was for {_short(old_class)}; set {name} in {source}"
                )
            default = new_info.defaults.get(name, _NO_DEFAULT) if new_info else _NO_DEFAULT
            if _plain(old_value) != default:
                self.log(
                    str(Dropped(source, _dotted(at), old_class, new_class, name, old_value, origin, default))
                )
                logged.add(name)
        return logged

    def _pin_default_class(
        self, owner: str, key: str, value: dict, at: Key, source: str, logged: set
    ) -> None:
        """Pin, after the file, the options that ``owner``'s default class for ``key`` would leak into the class the
        file names (jsonargparse merges the default under the parsed config); ``logged`` were reported already."""
        owner_info = self._info(owner)
        default_part = owner_info.defaults.get(key) if owner_info else None
        if not _is_spec(default_part) or _same_class(default_part["class_path"], value["class_path"]):
            return
        new_info = self._info(value["class_path"])
        default_info = self._info(default_part["class_path"])
        if new_info is None or default_info is None:
            return
        given = value.get("init_args") or {}
        leaked_options = {**default_info.defaults, **(default_part.get("init_args") or {})}
        for name, leaked in leaked_options.items():
            if name in given or name not in new_info.defaults:
                continue
            default = new_info.defaults[name]
            if _plain(leaked) != default:
                _put(self.after, (*at, "init_args", name), default)
                if name in logged:
                    continue
                old_class, new_class = default_part["class_path"], value["class_path"]
                node = _dotted(at)
                self.log(
                    str(
                        Dropped(
                            source, node, old_class, new_class, name, leaked, None, default, earlier=False
                        )
                    )
                )

    # -- bookkeeping -----------------------------------------------------------------------------------------------

    def _note(self, at: Key, value, source: str) -> None:
        self.origins[at] = source
        if isinstance(value, dict):
            for k, v in value.items():
                self._note((*at, k), v, source)
        elif isinstance(value, list):
            for n, v in enumerate(value):
                self._note((*at, n), v, source)

    def _forget(self, at: Key) -> None:
        for k in [k for k in self.origins if k[: len(at)] == at]:
            del self.origins[k]

    def _info(self, class_path: str) -> _ClassInfo | None:
        if class_path not in self.classes:
            self.classes[class_path] = _ClassInfo.of(class_path)
        return self.classes[class_path]


@dataclass(frozen=True)
class _ClassInfo:
    """The options a class takes: their defaults (YAML form; a class default as ``{class_path: ...}``) and the
    names of those without one."""

    defaults: dict
    required: frozenset

    @classmethod
    def of(cls, class_path: str) -> _ClassInfo | None:
        """Read from the signature; through jsonargparse when it forwards ``**kwargs`` (jsonargparse follows them
        to the parent class). None when ``class_path`` does not import (jsonargparse will say so when it parses)."""
        target = _import(class_path)
        if target is None:
            return None
        try:
            params = list(inspect.signature(target).parameters.values())
        except (TypeError, ValueError):
            return None
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return cls._from_jsonargparse(target)
        params = [p for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL]
        defaults = {
            p.name: {"class_path": _plain(p.default)} if inspect.isclass(p.default) else _plain(p.default)
            for p in params
            if p.default is not inspect.Parameter.empty
        }
        return cls(defaults, frozenset(p.name for p in params if p.default is inspect.Parameter.empty))

    @classmethod
    def _from_jsonargparse(cls, target) -> _ClassInfo | None:
        from jsonargparse import ArgumentParser

        parser = ArgumentParser(exit_on_error=False)
        try:
            parser.add_class_arguments(target, fail_untyped=False, sub_configs=True)
        except Exception:  # a class jsonargparse cannot describe: nothing known, nothing reset
            return None
        required = frozenset(a.dest for a in parser._actions if getattr(a, "required", False))
        defaults = {k: _plain(v) for k, v in _as_dict(parser.get_defaults()).items() if k not in required}
        return cls(defaults, required)


# -- small helpers -------------------------------------------------------------------------------------------------


def _read(value: str) -> tuple[str, Any, Path]:
    """(name for messages, parsed content or None, folder its relative references resolve from)."""
    path = Path(value)
    try:
        if path.is_file():
            return value, yaml.safe_load(path.read_text()), path.parent
    except (OSError, ValueError, yaml.YAMLError):
        return value, None, path.parent
    try:
        return "a --config string", yaml.safe_load(value), Path.cwd()
    except yaml.YAMLError:
        return value, None, Path.cwd()


def _replacing(arg: str, following: str | None) -> tuple[str, str, str, dict, Path] | None:
    """``(key, value, source, content, folder)`` when ``arg`` (with ``following``) is ``--data FILE`` or
    ``--data=FILE`` naming a file that holds a whole config of the option (a ``class_path``); else None."""
    flag, equals, value = arg.partition("=")
    if flag not in REPLACING_FLAGS or (not equals and following is None):
        return None
    value = value if equals else following
    if not Path(value).is_file():
        return None
    source, node, folder = _read(value)
    return (flag[2:], value, source, node, folder) if _is_spec(node) else None


def _subconfig(value, folder: Path):
    """A part given as a relative path to a YAML file (jsonargparse reads it from the including file's folder)."""
    if isinstance(value, str) and value.endswith(SUBCONFIG_SUFFIXES):
        path = folder / value
        if path.is_file():
            try:
                loaded = yaml.safe_load(path.read_text())
            except (OSError, yaml.YAMLError):
                return value
            return loaded if isinstance(loaded, dict) else value
    return value


def _import(class_path: str):
    module, _, name = class_path.rpartition(".")
    if not module:
        return None
    try:
        target = importlib.import_module(module)
    except ImportError:
        parent = _import(module)  # a nested class: module.Outer.Inner
        return getattr(parent, name, None) if parent is not None else None
    return getattr(target, name, None)


def _same_class(a: str, b: str) -> bool:
    if a == b:
        return True
    x, y = _import(a), _import(b)
    return x is not None and x is y


def _class(value) -> str | None:
    return value["class_path"] if _is_spec(value) else None


def _is_mapping_option(owner: str, key: str) -> bool:
    """Whether ``owner``'s option ``key`` is typed as a dict (jsonargparse replaces such a value as a whole)."""
    target = _import(owner)
    if target is None:
        return False
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # unresolvable annotations: treat as a namespace of options
        return False

    def is_mapping(hint) -> bool:
        origin = typing.get_origin(hint) or hint
        if origin in (dict, Mapping) or (inspect.isclass(origin) and issubclass(origin, Mapping)):
            return True
        return (
            any(is_mapping(a) for a in typing.get_args(hint))
            if origin in (typing.Union, UnionType)
            else False
        )

    return is_mapping(hints.get(key))


def _is_spec(value) -> bool:
    return isinstance(value, dict) and isinstance(value.get("class_path"), str)


def _as_dict(namespace) -> dict:
    return namespace.as_dict() if hasattr(namespace, "as_dict") else dict(namespace)


def _plain(value):
    """YAML form of a value: tuples as lists, classes and functions as import paths, namespaces as dicts."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if inspect.isclass(value) or inspect.isfunction(value):
        return f"{value.__module__}.{value.__qualname__}"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _put(tree: dict, at: Key, value) -> None:
    node = tree
    for key in at[:-1]:
        node = node.setdefault(key, {})
    node[at[-1]] = value


def _get(tree: dict, at: Key):
    node = tree
    for key in at:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _dotted(at: Key) -> str:
    return ".".join(f"[{k}]" if isinstance(k, int) else str(k) for k in at).replace(".[", "[")


def _short(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1]


def _show(value) -> str:
    if _is_spec(value):
        return _short(value["class_path"])
    if isinstance(value, dict) and value and all(_is_spec(v) for v in value.values()):  # named parts
        value = {k: _short(v["class_path"]) for k, v in value.items()}
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _yaml(tree: dict) -> str:
    return yaml.safe_dump(tree, default_flow_style=True, width=10**6, sort_keys=False).strip()


__all__ = ["Dropped", "stack_configs"]
