"""The dotted keys of a settings model (``patch.target_mpp``, ``slides.mpp_overrides.<entry>``): what each names,
how a text value for it is parsed, and the error for a key that names nothing.

The ``--set`` and environment sources (``pathgen.settings.sources``) share these rules, so a value means the same
whichever layer gives it.
"""

from __future__ import annotations

import difflib
import functools
import types
import typing
from typing import Any

import yaml
from pydantic import BaseModel

from pathgen.errors import cut, short_repr
from pathgen.settings.base import SettingsError
from pathgen.settings.yaml_text import load_yaml

PLAIN_TYPES = (str, int, float, bool)


def _unwrap_optional(annotation: Any) -> Any:
    """``X | None`` -> ``X``; any other annotation unchanged."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return args[0] if is_union and len(args) == 1 else annotation


def _field_types(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Every leaf key (``patch.target_mpp``) -> its annotation, ``| None`` removed."""
    found: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        annotation = _unwrap_optional(info.annotation)
        # An optional section (``clip.stage2``) has its keys like any other.
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found.update(_field_types(annotation, f"{prefix}{name}."))
        else:
            found[f"{prefix}{name}"] = annotation
    return found


def as_list(value: Any) -> Any:
    """A value for a list setting: a string is split on commas (``""`` is the empty list), one value is a list of
    one; a list (or tuple) and None are left as they are."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",")] if value.strip() else []
    if value is None or isinstance(value, list | tuple):
        return value
    return [value]


class SettingsKeys:
    """The key space of one settings model."""

    def __init__(self, model: type[BaseModel]) -> None:
        self.field_types = _field_types(model)
        self.all = list(self.field_types)
        # Map settings (``slides.mpp_overrides``): ``<key>.<entry>`` sets one entry.
        self.maps = tuple(k for k, a in self.field_types.items() if typing.get_origin(a) is dict)
        # List settings of plain values (``slides.roots``, ``eval.shots``): a string value is split on commas.
        self.scalar_lists = tuple(
            k
            for k, a in self.field_types.items()
            if typing.get_origin(a) is list and all(t in PLAIN_TYPES for t in typing.get_args(a))
        )

    @classmethod
    @functools.cache
    def of(cls, model: type[BaseModel]) -> SettingsKeys:
        return cls(model)

    def resolve(self, key: str) -> tuple[str, str | None] | None:
        """A dotted key -> (setting key, map entry or None); None when it names no setting.

        ``slides.mpp_overrides.CMU-1.svs`` -> ``("slides.mpp_overrides", "CMU-1.svs")``: everything after a map
        setting is the entry, dots included (file names are entries too). A section (``patch``) is a key too.
        """
        if key in self.field_types or any(k.startswith(key + ".") for k in self.all):
            return key, None
        for map_key in self.maps:
            entry = key[len(map_key) + 1 :]
            if key.startswith(map_key + ".") and entry:
                return map_key, entry
        return None

    def suggestions(self, key: str) -> list[str]:
        leaf = key.split(".")[-1]
        return [k for k in self.all if k.split(".")[-1] == leaf] or difflib.get_close_matches(key, self.all, 3)

    def unknown_key_error(self, key: str) -> SettingsError:
        key = str(key)[:200]  # a long key is not one: do not spend time matching all of it
        suggestions = self.suggestions(key)
        hint = f"; did you mean {' or '.join(repr(s) for s in suggestions)}?" if suggestions else ""
        return SettingsError(f"unknown setting {short_repr(key)}{hint} (see `pathgen settings` for every key)")

    def parse_text(self, text: str, key: str | None = None) -> Any:
        """The text of ``--set key=TEXT`` or of an environment variable -> the value for ``key``.

        YAML scalars give the natural types: 0.25, 672, true, null, [a, b], {k: v}. For a list setting of plain
        values the text is comma-separated (``/a,/b``; items stay strings, which pydantic converts) unless it is a
        YAML list (``[/a, /b]``, the way to write an item that holds a comma).
        """
        if key in self.scalar_lists and not text.lstrip().startswith("["):
            return as_list(text)
        try:
            return load_yaml(text, f"the value of {cut(str(key), 100)}") if text.strip() else ""
        except yaml.YAMLError:
            return text

    def tree(self, assignments: dict[str, Any]) -> tuple[dict[str, Any], set[tuple[str, ...]]]:
        """``{dotted key: value}`` -> the nested mapping a settings source gives, and the map settings given whole
        (``slides.mpp_overrides={x: 1}``, not one entry), which replace the map of the layers below."""
        tree: dict[str, Any] = {}
        whole_maps = set()
        for key, value in assignments.items():
            resolved = self.resolve(key)
            if resolved is None:
                raise self.unknown_key_error(key)
            setting, entry = resolved
            if setting in self.scalar_lists:
                # A programmatic or flow-parameter override may give a list setting as "a,b" or one value.
                value = as_list(value)
            elif setting in self.maps and entry is None:
                whole_maps.add(tuple(setting.split(".")))
            _set_path(tree, setting.split(".") + ([entry] if entry is not None else []), value)
        return tree, whole_maps


def _set_path(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value
