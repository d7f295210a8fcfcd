"""Reading YAML files strictly: plain values only (``yaml.SafeLoader``), and a key given twice in one
mapping is an error naming the key and both lines, where plain YAML would silently keep the last one
(a duplicated variant would vanish from an experiment). Sizes are limited: a file of at most
``MAX_YAML_BYTES`` whose values, with every alias expanded, number at most ``MAX_YAML_VALUES`` (a few hundred
bytes of nested aliases would otherwise expand to gigabytes once copied)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

_MERGE_TAG = "tag:yaml.org,2002:merge"
MAX_YAML_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000


class DuplicateKeyError(yaml.YAMLError):
    pass


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys (``<<`` merge keys may still be overridden)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = key in first_line
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                continue
            line = key_node.start_mark.line + 1
            if seen:
                raise DuplicateKeyError(f"duplicate key {key!r} at line {line} (first given at line "
                                        f"{first_line[key]}); give each key once")
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, what: str = "YAML file") -> Any:
    """The contents of the YAML file ``path`` (None when empty); errors name ``what`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size:,} bytes, more than a {what} may have "
                         f"({MAX_YAML_BYTES:,})")
    try:
        with open(path, encoding="utf-8") as fh:
            tree = yaml.load(fh, Loader=UniqueKeyLoader)
        if _count_values(tree, MAX_YAML_VALUES) > MAX_YAML_VALUES:
            raise ValueError(f"{path}: more than {MAX_YAML_VALUES:,} values once its aliases (*name) are "
                             f"expanded; a {what} that large is refused")
        return tree
    except DuplicateKeyError as err:
        raise ValueError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: cannot parse YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text file ({err})") from None


def _count_values(tree: Any, budget: int) -> int:
    """How many values ``tree`` holds with shared (aliased) parts counted each time they appear; stops
    counting past ``budget``, so that the count is cheap even for a tree that expands exponentially."""
    count, stack = 0, [tree]
    while stack and count <= budget:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return count


# ------------------------------------------------------------------------- where a key is in a file

_KEY_PATTERNS = (
    (re.compile(r"key '([\w.]+)'"), "{}"),  # OmegaConf's merge errors (dynexit.config.merge)
    (re.compile(r"model field '(\w+)'"), "model.{}"),  # the model families' own checks
    (re.compile(r"unknown (?:\w+ )?model\b"), "model.name"),
    (re.compile(r"^([a-z_]+(?:\.\w+)+)\b"), "{}"),  # the config checks: "train.lr must be ..."
)


def key_in_message(message: str) -> str | None:
    """The dotted configuration key an error message is about (``train.lr``), or None."""
    for pattern, form in _KEY_PATTERNS:
        match = pattern.search(message)
        if match:
            return form.format(*match.groups())
    return None


def key_lines(path: str | Path, dotted: str) -> list[int]:
    """The lines (1-based, in file order) where the YAML file ``path`` sets the key ``dotted`` (``a.b.c``),
    at any depth (a spec's ``base``, a variant, a grid), whether written nested (``a: {b: {c: 1}}``) or
    with dotted keys (``a.b.c: 1``, ``a: {b.c: 1}``). An unreadable file gives no lines."""
    try:
        node = yaml.compose(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    lines: list[int] = []
    _collect(node, dotted, lines)
    return sorted(set(lines))


def _collect(node: Any, dotted: str, lines: list[int], anchored: str | None = None) -> None:
    """Adds to ``lines`` where ``dotted`` is set below ``node``; ``anchored``: the rest of a key whose
    first parts were the keys just above (it must continue right here)."""
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _collect(item, dotted, lines)
        return
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value in node.value:
        key = str(getattr(key_node, "value", ""))
        for want in filter(None, (anchored, dotted)):
            if key == want:
                lines.append(key_node.start_mark.line + 1)
            elif want.startswith(key + "."):
                _collect(value, dotted, lines, anchored=want[len(key) + 1:])
        _collect(value, dotted, lines)


def line_note(path: str | Path | None, message: str) -> str:
    """`` (line N)`` (or ``lines``) where the file ``path`` sets the key ``message`` is about; "" when unknown."""
    key = key_in_message(message)
    lines = key_lines(path, key) if path is not None and key else []
    if not lines:
        return ""
    return f" (line {lines[0]})" if len(lines) == 1 else f" (lines {', '.join(map(str, lines))})"
