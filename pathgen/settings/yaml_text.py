"""Settings YAML: parsed without alias expansion and with a size bound (settings files, prompts files, and the
values of ``--set`` and ``PATHGEN_*`` variables)."""

from __future__ import annotations

from typing import Any

import yaml

from pathgen.errors import cut
from pathgen.settings.base import MAX_YAML_BYTES, SettingsError


class _AliasRefused(yaml.composer.ComposerError):
    """A YAML alias (``*name``) in settings: refused, since a few hundred bytes of nested aliases expand to
    gigabytes (the "billion laughs")."""


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases before composing them (anchors alone are harmless)."""

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasRefused(
                None,
                None,
                f"found the alias *{cut(str(event.anchor), 60)}: aliases are not allowed here (nested aliases "
                "expand without bound); write the value out in full",
                event.start_mark,
            )
        return super().compose_node(parent, index)


def load_yaml(text: str, what: str) -> Any:
    """Parse settings YAML without alias expansion and with a size bound; SettingsError naming ``what`` (a file,
    a variable, a ``--set`` key) and the fix otherwise."""
    if len(text) > MAX_YAML_BYTES:
        raise SettingsError(
            f"{what} is {len(text)} characters long, more than the {MAX_YAML_BYTES} allowed for settings YAML; "
            "check that it is the right file"
        )
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except _AliasRefused as exc:
        raise SettingsError(f"{what}: {cut(str(exc))}") from None
