"""Config errors a person can act on: what is wrong, where it was set (a ``--config`` file, a file it includes, a
flag), and what to do; for a mistyped key, the nearest valid keys at that level (``max_epoch`` -> ``max_epochs``).

jsonargparse (checked on 4.53) validates the config after merging every file and flag, so its errors cannot say
which file a key came from; a wrong key among a class's options comes as nested text (``Parser key "model": ...
Problem with given class_path '...': ... Option 'k' is not accepted``) followed by the whole value on one line, and
an error raised by a class while the config is built comes wrapped the same way. :func:`parse_error` reads the key's
address from that text, looks it up in the arguments' files and flags, and lists the options of the class (or the
parser's group) at that level; :func:`build_error` names the classes being built and the options its message
mentions, with where they were set.
"""

from __future__ import annotations

import difflib
import importlib
import re
import textwrap
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SUBCONFIG_SUFFIXES = (".yaml", ".yml", ".json")

_KEY = re.compile(r'^Parser key "([^"]+)":')
_CLASS = re.compile(r"^Problem with given class_path '([^']+)':")
_NOT_ACCEPTED = re.compile(r"^Option '([^']+)' is not accepted")
_GROUP = re.compile(r"^Group '([^']+)' does not accept option '([^']+)'")
_EXPECTED = re.compile(r"^Expected a <class '[^']+'>")
_SUBCOMMAND = re.compile(r"Subcommand '([^']+)' does not accept option '([^']+)'")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.*)")
_NOISE = (  # lines of jsonargparse's union errors that say nothing to act on ("Given value": the whole part)
    "Given value",
    "Subtypes:",
    "Does not validate against any of the Union subtypes",
    "Errors:",
    "- Expected a <class 'NoneType'>",
)


class ConfigError(ValueError):
    """A config that cannot be parsed or built; the message names the option, where it was set and what to do."""


@dataclass(frozen=True)
class UnknownKey:
    """A key that is no option at its level."""

    path: tuple[str, ...]
    """Its address from the top of the config, ``init_args`` included where a class's options start."""
    owner: str | None
    """Class path of the class whose options the level holds; None for a parser group (``trainer``)."""
    level: tuple[str, ...]
    """Address of the level inside the owner's options (or the parser's, when no owner), without the key."""


def parse_error(error: Exception, parser: Any, args: Sequence[str]) -> ConfigError:
    """The :class:`ConfigError` for a jsonargparse parse error of ``parser`` on ``args``."""
    text = str(error)
    unknown = unknown_key(text)
    if unknown is not None:
        return ConfigError(_unknown_key_message(unknown, parser, args))
    path = _deepest_key(text)
    if not path:
        return ConfigError(f"{clean(text)}\n`--help` lists the options and their types")
    problems = [
        line.strip().removeprefix("- ")
        for line in clean(text).splitlines()
        if line.strip()
        and not _KEY.match(line.strip().removeprefix("- "))
        and not _CLASS.match(line.strip().removeprefix("- "))
    ]
    places = where(path, args)[:1]  # the last setting is the one parsed
    head = ".".join(path) + (f" (from {places[0]})" if places else "")
    body = problems[0] if len(problems) == 1 else "\n".join(f"  - {p}" for p in problems)
    sep = ": " if len(problems) == 1 else ":\n"
    return ConfigError(f"{head}{sep}{body}\n`--help` lists the options and their types")


def _deepest_key(text: str) -> tuple[str, ...]:
    """The address of the most nested ``Parser key`` of a jsonargparse message (``init_args`` where a class's
    options start)."""
    stack: list[tuple[int, tuple[str, ...]]] = []
    deepest: tuple[str, ...] = ()
    for line in text.splitlines():
        stripped = line.lstrip(" ")
        indent = len(line) - len(stripped)
        stripped = stripped.removeprefix("- ")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if m := _KEY.match(stripped):
            stack.append((indent, tuple(m.group(1).split("."))))
        elif _CLASS.match(stripped):
            stack.append((indent, ("init_args",)))
        else:
            continue
        path = tuple(p for _, parts in stack for p in parts)
        if len(path) > len(deepest) and path[-1] != "init_args":
            deepest = path
    return deepest


def build_error(error: BaseException, args: Sequence[str]) -> ConfigError:
    """The :class:`ConfigError` for an error raised while the config's classes were built: the class(es) being
    built, the original message, and where the options it names were set."""
    root = root_cause(error)
    building = _building(root)
    # jsonargparse chains only the first union member's error: the class's own error for ``Optional[Class]``,
    # but "Expected a <class 'str'>" for ``Union[str, Strategy]``; then its list of every member's error says more
    message = clean(str(root)) if building else _union_errors(error)
    head = f"while building {' > '.join(c.__name__ for c in building)}: " if building else ""
    places = []
    for cls in building:
        for option in _options_of(cls):
            if re.search(rf"\b{re.escape(option)}\b", message):
                places += [f"{option} from {p}" for p in _find_option(option, cls.__name__, args)]
    hint = f"\n({'; '.join(dict.fromkeys(places))})" if places else ""
    return ConfigError(f"{head}{message}{hint}")


def _union_errors(error: BaseException) -> str:
    """The errors a jsonargparse union error lists, without the members a value could not be anyway."""
    lines = [line.strip().removeprefix("- ") for line in clean(str(error)).splitlines() if line.strip()]
    useful = [line for line in lines if not _EXPECTED.match(line)]
    return "\n".join(useful or lines)


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of ``error``'s ``__cause__`` chain (jsonargparse raises its own from the class's)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def clean(text: str) -> str:
    """jsonargparse's message without the union boilerplate and the ``Given value: <whole config>`` lines."""
    lines = [line for line in text.splitlines() if not line.strip().startswith(_NOISE)]
    return "\n".join(
        line if len(line) <= 300 else line[:297] + "..."
        for line in textwrap.dedent("\n".join(lines)).splitlines()
    ).strip()


# -- reading jsonargparse's message ------------------------------------------------------------------------------
def unknown_key(text: str) -> UnknownKey | None:
    """The key a jsonargparse message says is no option, with its address; None for other errors."""
    top = _SUBCOMMAND.search(text)
    if top:
        path = tuple(top.group(2).split("."))
        return UnknownKey(path, None, path[:-1])
    flag = _UNRECOGNIZED.search(text)
    if flag:
        first = next((t for t in flag.group(1).split() if t.startswith("--")), None)
        if first is None:
            return None
        path = tuple(first[2:].split("=", 1)[0].split("."))
        return UnknownKey(path, None, tuple(p for p in path[:-1] if p != "init_args"))
    stack: list[tuple[int, tuple[str, ...], str | None]] = []  # (indent, address components, class path)
    for line in text.splitlines():
        stripped = line.lstrip(" ")
        indent = len(line) - len(stripped)
        stripped = stripped.removeprefix("- ")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if m := _KEY.match(stripped):
            stack.append((indent, tuple(m.group(1).split(".")), None))
        elif m := _CLASS.match(stripped):
            stack.append((indent, ("init_args",), m.group(1)))
        elif (m := _NOT_ACCEPTED.match(stripped)) or (m := _GROUP.match(stripped)):
            keys = tuple(".".join(m.groups()).split("."))
            path = tuple(p for _, parts, _ in stack for p in parts) + keys
            owners = [(n, c) for n, (_, _, c) in enumerate(stack) if c is not None]
            if not owners:
                return UnknownKey(path, None, path[:-1])
            last = owners[-1][0]
            inside = tuple(p for _, parts, _ in stack[last + 1 :] for p in parts) + keys[:-1]
            return UnknownKey(path, owners[-1][1], tuple(p for p in inside if p != "init_args"))
    return None


def _options_around(unknown: UnknownKey, parser: Any, args: Sequence[str]) -> list[str]:
    """Dotted option names of the unknown key's owner class, else of the parser (of the subcommand ``args`` run)."""
    if unknown.owner is None:
        return _parser_options(parser, args)
    cls = _import(unknown.owner)
    return _options_of(cls, nested=True) if cls is not None else []


def _unknown_key_message(unknown: UnknownKey, parser: Any, args: Sequence[str]) -> str:
    key = unknown.path[-1]
    dotted = ".".join(p for p in unknown.path if p != "init_args")  # the YAML nesting, as a person writes it
    dests = _options_around(unknown, parser, args)
    n = len(unknown.level)
    level = sorted(
        {d.split(".")[n] for d in dests if d.split(".")[:n] == list(unknown.level) and len(d.split(".")) > n}
    )
    close = nearest(key, level)
    if not close:  # the right key at another level (``max_epochs`` at the top instead of under ``trainer``)
        close = [d for d in dests if d.split(".")[-1] == key][:3]
    places = where(unknown.path, args)
    owner = unknown.owner.rsplit(".", 1)[-1] if unknown.owner else ".".join(unknown.level) or None
    message = f"{dotted} is not an option" + (f" of {owner}" if owner else "")
    message += f" (from {' and '.join(places)})" if places else ""
    message += (
        f"; did you mean {' or '.join(close)}?" if close else f"; the options there: {', '.join(level)}"
    )
    if unknown.owner is not None:
        cut = (
            max(i for i, p in enumerate(unknown.path[:-1]) if p == "init_args")
            if "init_args" in unknown.path[:-1]
            else 0
        )
        flag = ".".join(unknown.path[:cut])
        message += f"\n`--{flag}.help {unknown.owner}` lists {owner}'s options" if flag else ""
    else:
        message += "\n`--help` lists the options"
    return message


def nearest(key: str, options: Sequence[str], cutoff: float = 0.6, margin: float = 0.1) -> list[str]:
    """The options closest to ``key`` by :class:`difflib.SequenceMatcher` ratio: those at least ``cutoff`` and
    within ``margin`` of the best (``max_epoch`` gets ``max_epochs``, not also ``min_epochs``), best first."""
    scored = sorted(((difflib.SequenceMatcher(None, key, o).ratio(), o) for o in options), reverse=True)
    scored = [(r, o) for r, o in scored if r >= cutoff]
    return [o for r, o in scored if r >= scored[0][0] - margin] if scored else []


def _parser_options(parser: Any, args: Sequence[str]) -> list[str]:
    """Option names of ``parser``, or of the subcommand ``args`` runs when it has subcommands."""
    subcommands = getattr(parser, "_subcommands_action", None)
    if subcommands is not None:
        name = next((a for a in args if a in subcommands.choices), None)
        if name is not None:
            parser = subcommands.choices[name]
    return [
        a.dest for a in getattr(parser, "_actions", []) if a.dest != "help" and not a.dest.endswith(".help")
    ]


def _options_of(cls: type, nested: bool = False) -> list[str]:
    """The options jsonargparse gives ``cls`` (``nested``: dataclass options' own fields as ``stage.name``)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    try:
        parser.add_class_arguments(cls, fail_untyped=False, sub_configs=True)
    except Exception:  # a class jsonargparse cannot describe: no suggestion rather than a second error
        return []
    dests = [a.dest for a in parser._actions if a.dest != "help" and not a.dest.endswith(".help")]
    return dests if nested else sorted({d.split(".")[0] for d in dests})


def _building(error: BaseException) -> list[type]:
    """The classes whose ``__init__`` was running when ``error`` was raised, outermost first (private classes,
    like Lightning's ``_AcceleratorConnector``, left out)."""
    classes: list[type] = []
    for frame, _ in traceback.walk_tb(error.__traceback__):
        if frame.f_code.co_name != "__init__" or "self" not in frame.f_locals:
            continue
        cls = type(frame.f_locals["self"])
        if (
            not cls.__name__.startswith("_")
            and not cls.__module__.startswith("jsonargparse")
            and cls not in classes
        ):
            classes.append(cls)
    return classes


def _import(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None) if module else None
    except ImportError:
        return None


# -- where a key was set ---------------------------------------------------------------------------------------
def where(path: Sequence[str], args: Sequence[str]) -> list[str]:
    """Where in ``args`` (its ``--config`` files, the files they include, its flags) the key at ``path`` is set,
    last setting first."""
    target = [p for p in path if p != "init_args"]
    found = [_lookup(tree, target, folder, name) for name, tree, folder in _sources(args)]
    return list(dict.fromkeys(f for f in reversed(found) if f is not None))


def _find_option(option: str, class_name: str, args: Sequence[str]) -> list[str]:
    """Where ``option`` of the class named ``class_name`` is set: under a node naming that class, or by a flag."""
    places = []
    for name, tree, _ in _sources(args):
        for address, owner in _walk(tree, ()):
            if address[-1] == option and (owner is None or owner.rsplit(".", 1)[-1] == class_name):
                places.append(f"{name} ({'.'.join(address)})" if name.endswith(SUBCONFIG_SUFFIXES) else name)
    return list(dict.fromkeys(reversed(places)))


def _walk(node: Any, at: tuple, owner: str | None = None) -> Iterator[tuple[tuple, str | None]]:
    if isinstance(node, dict):
        owner = node.get("class_path", owner) if isinstance(node.get("class_path"), str) else owner
        for key, value in node.items():
            if key == "class_path":
                continue
            if key != "init_args":
                yield (*at, str(key)), owner
            yield from _walk(value, (*at, str(key)), owner if key == "init_args" else None)


def _sources(args: Sequence[str]) -> list[tuple[str, Any, Path]]:
    """(name for messages, YAML tree from the top of the config, folder its file references resolve from) for
    every ``--config`` file or string and every flag of ``args``, in order."""
    out: list[tuple[str, Any, Path]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-") or arg == "-":
            i += 1
            continue
        if "=" in arg:
            flag, value = arg.split("=", 1)
            i += 1
        else:
            flag = arg
            value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else None
            i += 2 if value is not None else 1
        if flag in ("--config", "-c") and value is not None:
            path = Path(value)
            if path.is_file():
                out.append((value, _load(path), path.parent))
            else:
                out.append(("a --config string", _safe_yaml(value), Path.cwd()))
            continue
        keys = flag.lstrip("-").split(".")
        shown = f"the flag {flag} {value}" if value is not None else f"the flag {flag}"
        out.append((shown, _nest(keys, value), Path.cwd()))
        if value is not None and value.endswith(SUBCONFIG_SUFFIXES) and Path(value).is_file():
            out.append((value, _nest(keys, _load(Path(value))), Path(value).parent))
    return out


def _lookup(tree: Any, target: Sequence[str], folder: Path, name: str) -> str | None:
    """The name of the file (``name``, or a file it includes) that holds ``target`` in ``tree``; None if none."""
    node = tree
    for n, key in enumerate(target):
        if isinstance(node, str) and node.endswith(SUBCONFIG_SUFFIXES) and (folder / node).is_file():
            path = folder / node
            return _lookup(_load(path), target[n:], path.parent, str(path))
        if not isinstance(node, dict):
            return None
        if key in node:
            node = node[key]
        elif isinstance(node.get("init_args"), dict) and key in node["init_args"]:
            node = node["init_args"][key]
        else:
            return None
    return name


def _nest(keys: Sequence[str], value: Any) -> dict:
    for key in reversed(keys):
        value = {key: value}
    return value


def _load(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None


def _safe_yaml(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


__all__ = [
    "ConfigError",
    "UnknownKey",
    "build_error",
    "clean",
    "parse_error",
    "root_cause",
    "unknown_key",
    "where",
]
