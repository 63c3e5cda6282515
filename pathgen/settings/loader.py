"""Loading the settings: a YAML file (and its variants), ``PATHGEN_*`` environment variables and ``--set``.

Precedence, lowest to highest: defaults < YAML file < ``PATHGEN_*`` environment < ``--set key=value``
(``Settings.settings_customise_sources`` orders the pydantic-settings sources of ``pathgen.settings.sources``).
Nested fields use dots on the command line (``patch.target_mpp=0.25``) and double underscores in the
environment (``PATHGEN_PATCH__TARGET_MPP=0.25``). One entry of a map setting is a further dot or double underscore
(``slides.mpp_overrides.<slide_id>=0.5``, ``PATHGEN_SLIDES__MPP_OVERRIDES__<SLIDE_ID>=0.5``); a list setting takes
comma-separated values (``slides.roots=/a,/b``) or a YAML list (``slides.roots=[/a, /b]``). A ``PATHGEN_*`` variable
that names no setting is an error, except the few in ``NON_SETTING_ENV_VARS``. Credentials never live here: they
come from the environment. A YAML file may hold named variants of itself (``variants: {NAME: {...settings}}``):
``FILE#NAME`` loads the file with that variant deep-merged over it; ``variants`` itself is never a setting.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from pathgen.errors import cut, short_repr
from pathgen.settings.base import MAX_ERRORS_SHOWN, SettingsError
from pathgen.settings.keys import SettingsKeys
from pathgen.settings.model import Settings
from pathgen.settings.sources import SettingsInputs, settings_inputs

ENV_PREFIX = Settings.model_config["env_prefix"]
KEYS = SettingsKeys.of(Settings)
ALL_KEYS = KEYS.all
MAP_KEYS = KEYS.maps
SCALAR_LIST_KEYS = KEYS.scalar_lists


def parse_assignments(assignments: Iterable[str]) -> dict[str, Any]:
    """``["patch.patch_px=512", "slides.roots=/a,/b"]`` -> ``{"patch.patch_px": 512, "slides.roots": ["/a", "/b"]}``."""
    parsed: dict[str, Any] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SettingsError(
                f"--set expects key=value, got {short_repr(item)} (for example --set patch.target_mpp=0.5)"
            )
        parsed[key.strip()] = KEYS.parse_text(value, key.strip())
    return parsed


def _format_validation_error(err: ValidationError) -> str:
    """One line per wrong field (at most MAX_ERRORS_SHOWN), each quoting its input cut to a few hundred characters:
    an input can be huge (a long string, a nested list) and the message must stay readable and cheap."""
    lines = []
    errors = err.errors(include_url=False)
    for item in errors[:MAX_ERRORS_SHOWN]:
        field = cut(".".join(str(p) for p in item["loc"]), 200)
        got = item.get("input")
        got_text = "" if isinstance(got, Mapping) else f" (got {short_repr(got)})"
        if item["type"] == "extra_forbidden":
            lines.append(str(KEYS.unknown_key_error(field)))
        else:
            lines.append(f"setting {field!r}: {cut(item['msg'], 200)}{got_text}")
    if len(errors) > MAX_ERRORS_SHOWN:
        lines.append(f"and {len(errors) - MAX_ERRORS_SHOWN} more")
    return "invalid settings: " + "; ".join(lines)


def load_settings(
    config_file: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings from a YAML file (``FILE#VARIANT`` for one of its variants), the environment (``environ``,
    else ``os.environ``) and ``key=value`` overrides; fail naming the field."""
    if overrides is None or isinstance(overrides, Mapping):
        assignments = dict(overrides or {})
    else:
        assignments = parse_assignments(overrides)
    try:
        with settings_inputs(SettingsInputs(config_file or None, environ, assignments)):
            return Settings()
    except ValidationError as err:
        raise SettingsError(_format_validation_error(err)) from None


def run_settings(
    store: str | None = None, config: str | None = None, overrides: Mapping[str, Any] | None = None
) -> Settings:
    """The settings of a flow run: its parameters (store, config file, overrides) over the environment."""
    merged = dict(overrides or {})
    if store:
        merged["store"] = store
    return load_settings(config, merged)
