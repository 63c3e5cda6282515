"""The pydantic-settings sources of the factory's settings: a YAML file (``FILE#VARIANT`` for one of its variants),
``PATHGEN_*`` environment variables and ``--set`` assignments. ``Settings.settings_customise_sources`` orders them.

pydantic-settings chooses a source's inputs on the class, not per instance (pydantic-settings issue #259: a YAML
file cannot be named when the settings are built), so the file, the environment and the assignments of one build
travel in ``SETTINGS_INPUTS``, a context variable that ``settings_inputs`` sets for the duration of the build.
"""

from __future__ import annotations

import difflib
import os
from abc import abstractmethod
from collections.abc import Iterator, Mapping
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, YamlConfigSettingsSource

from pathgen.errors import cut, short_repr
from pathgen.settings.base import MAX_YAML_BYTES, SettingsError
from pathgen.settings.keys import SettingsKeys
from pathgen.settings.yaml_text import load_yaml

# PATHGEN_* variables that are not settings but are read elsewhere; every other PATHGEN_* variable must name a
# setting, so that a mistyped one fails instead of being ignored. Add a variable here when code starts reading it.
NON_SETTING_ENV_VARS = frozenset(
    {
        "PATHGEN_S3_ENDPOINT_URL",  # tasks/store/objects.py: the S3 endpoint (prefect.yaml, deploy/local-stack.sh)
        "PATHGEN_STAGING_DIR",  # tasks/store/objects.py: local copies of remote objects
        "PATHGEN_HOME",  # prefect.yaml and deploy/Dockerfile.gpu-worker: where workers find the code
        "PATHGEN_THREADS",  # pathgen/processes.py: the thread budget
        "PATHGEN_LOCAL_API_IDLE_S",  # pathgen/local_api.py: how long the shared local Prefect API waits
        "PATHGEN_API_LOST_S",  # pathgen/local_api.py: how long a command waits for a silent Prefect API
        "PATHGEN_STACK_STATE",  # deploy/local-stack.sh: marks the processes the local stack started
        "PATHGEN_DIGEST_CACHE",  # pathgen/digest.py: cache of model folder digests
        "PATHGEN_CHECKPOINT_CACHE_GB",  # tasks/clip/spec.py: the bound of the fetched-checkpoint cache
        "PATHGEN_MODEL_CACHE",  # agents/tiny.py: where the tiny random-weight models are built
        "PATHGEN_OPENAI_API_KEY",  # agents/backends/openai_compat.py: a credential, never a setting
        "PATHGEN_KILL_TRIALS",  # tests/test_exactly_once.py, which runs `pathgen` with it set
        "PATHGEN_KILL_SEED",  # tests/test_exactly_once.py
    }
)
VARIANTS_KEY = "variants"  # a settings file's named variants of itself (FILE#NAME); never a setting


@dataclass(frozen=True)
class SettingsInputs:
    """What one build of the settings reads besides the defaults: a YAML file and an environment."""

    config_file: str | os.PathLike | None = None
    environ: Mapping[str, str] | None = None  # None: os.environ
    assignments: Mapping[str, Any] = field(default_factory=dict)  # dotted keys (``--set``), the top layer


# Unset: a bare ``Settings()`` reads ``SettingsInputs()``, os.environ and no file.
SETTINGS_INPUTS: ContextVar[SettingsInputs | None] = ContextVar("pathgen_settings_inputs", default=None)


@contextmanager
def settings_inputs(inputs: SettingsInputs) -> Iterator[None]:
    """Within the block, ``Settings()`` reads ``inputs`` (the context variable is per thread and per task)."""
    token = SETTINGS_INPUTS.set(inputs)
    try:
        yield
    finally:
        SETTINGS_INPUTS.reset(token)


class ReplacedMaps:
    """Map settings given whole by a source (``slides.mpp_overrides={x: 1}``), which the sources below it leave out:
    pydantic-settings deep-merges every mapping across sources, but a whole map replaces the lower layers' map, as
    one entry (``slides.mpp_overrides.x=1``) joins it. One record per build, shared by its sources, which
    pydantic-settings calls from the highest to the lowest."""

    def __init__(self) -> None:
        self.paths: set[tuple[str, ...]] = set()

    def below(self, tree: dict[str, Any], own: AbstractSet[tuple[str, ...]] = frozenset()) -> dict[str, Any]:
        """``tree`` (a lower source's mapping) without the maps a higher source replaced; then ``own`` (this
        source's whole maps) are replaced for the sources below it."""
        for path in self.paths:
            parent = tree
            for part in path[:-1]:
                parent = parent.get(part) if isinstance(parent, dict) else None
            if isinstance(parent, dict):
                parent.pop(path[-1], None)
        self.paths |= own
        return tree


class _DottedSource(PydanticBaseSettingsSource):
    """A source whose values come as dotted keys; ``__call__`` gives them as the nested mapping of the model."""

    def __init__(self, settings_cls: type[BaseSettings], replaced: ReplacedMaps) -> None:
        super().__init__(settings_cls)
        self.replaced = replaced

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # the whole mapping comes from __call__

    @abstractmethod
    def assignments(self) -> dict[str, Any]:
        """``{dotted key: value}``."""

    def __call__(self) -> dict[str, Any]:
        tree, whole_maps = SettingsKeys.of(self.settings_cls).tree(self.assignments())
        return self.replaced.below(tree, whole_maps)


class AssignmentsSource(_DottedSource):
    """``--set key=value`` (already parsed) or a flow's overrides: ``{"patch.patch_px": 512}``."""

    def __init__(
        self, settings_cls: type[BaseSettings], replaced: ReplacedMaps, assignments: Mapping[str, Any]
    ) -> None:
        super().__init__(settings_cls, replaced)
        self._assignments = dict(assignments)

    def assignments(self) -> dict[str, Any]:
        return self._assignments


class EnvironmentSource(_DottedSource):
    """``PATHGEN_<SECTION>__<KEY>`` variables (prefix and delimiter from the model's ``env_prefix`` and
    ``env_nested_delimiter``): ``PATHGEN_SLIDES__MPP_OVERRIDES__NOMPP=0.5`` -> ``slides.mpp_overrides.nompp``.

    Variable names are upper case, so the key is lower-cased, map entries included: the variable above sets the
    entry ``nompp``; an entry with capitals, dashes or dots is set with ``--set`` or the YAML file. Values are parsed
    as ``--set`` values are. A ``PATHGEN_*`` variable that names no setting and is not in ``NON_SETTING_ENV_VARS``
    raises SettingsError with the likely name.
    """

    def __init__(
        self, settings_cls: type[BaseSettings], replaced: ReplacedMaps, environ: Mapping[str, str] | None
    ) -> None:
        super().__init__(settings_cls, replaced)
        self.environ = os.environ if environ is None else environ
        self.prefix = self.config.get("env_prefix", "")
        self.delimiter = self.config.get("env_nested_delimiter") or "__"

    def key_of(self, name: str) -> str:
        """``PATHGEN_PATCH__TARGET_MPP`` -> ``patch.target_mpp``."""
        return name[len(self.prefix) :].lower().replace(self.delimiter, ".")

    def name_of(self, key: str) -> str:
        """``patch.target_mpp`` -> ``PATHGEN_PATCH__TARGET_MPP``."""
        return self.prefix + key.upper().replace(".", self.delimiter)

    def assignments(self) -> dict[str, Any]:
        keys = SettingsKeys.of(self.settings_cls)
        found = {}
        for name, value in self.environ.items():
            if not name.startswith(self.prefix) or name in NON_SETTING_ENV_VARS:
                continue
            key = self.key_of(name)
            if keys.resolve(key) is None:
                raise self.unknown_variable_error(name, key)
            found[key] = keys.parse_text(value, key)
        return found

    def unknown_variable_error(self, name: str, key: str) -> SettingsError:
        """The error for a variable that names no setting: the likely variable meant, and the fix."""
        # Settings first, as for --set; then the non-setting variables spelled alike, compared without the shared
        # prefix (which would make every pair of names look alike).
        others = {n[len(self.prefix) :]: n for n in NON_SETTING_ENV_VARS}
        alike = difflib.get_close_matches(name[len(self.prefix) :], list(others), 2)
        suggestions = [self.name_of(s) for s in SettingsKeys.of(self.settings_cls).suggestions(key)]
        suggestions += [others[a] for a in alike]
        hint = f"; did you mean {' or '.join(dict.fromkeys(suggestions))}?" if suggestions else ""
        return SettingsError(
            f"unknown setting {key!r} from environment variable {name}{hint} (rename or unset it; settings are "
            f"{self.prefix}<SECTION>__<KEY>, see `pathgen settings` for every key)"
        )


def split_variant(config_file: str | os.PathLike) -> tuple[Path, str | None]:
    """``deploy/paper.yaml#clip-l`` -> (the file, the variant); a file whose own name holds ``#`` is taken whole."""
    text = os.fspath(config_file)
    path, sep, variant = text.rpartition("#")
    if not sep or Path(text).is_file():
        return Path(text), None
    if not variant.strip():
        raise SettingsError(
            f"config {short_repr(text)} names no variant after '#': write FILE#VARIANT (for example "
            "deploy/paper.yaml#clip-l), or drop the '#'"
        )
    return Path(path), variant.strip()


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and base[key]:
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def with_variant(loaded: dict[str, Any], variant: str | None, what: str) -> dict[str, Any]:
    """A settings file's mapping without its ``variants``, and with the chosen one deep-merged over it."""
    variants = loaded.pop(VARIANTS_KEY, None)
    if variants is not None and not isinstance(variants, dict):
        raise SettingsError(
            f"{what}: {VARIANTS_KEY} must map each variant's name to settings, e.g. "
            f"{VARIANTS_KEY}: {{clip-l: {{clip: {{model: ViT-L-14-336}}}}}}"
        )
    if variant is None:
        return loaded
    if variant not in (variants or {}):
        known = ", ".join(sorted(str(name) for name in variants or {})) or "none"
        raise SettingsError(
            f"{what} has no variant {short_repr(variant)} (its variants: {known}); name one of them after '#', or "
            "drop the '#' for the file as it is"
        )
    chosen = variants[variant] or {}
    if not isinstance(chosen, dict) or VARIANTS_KEY in chosen:
        raise SettingsError(f"{what}: variant {variant!r} must be a mapping of settings, without variants of its own")
    return _deep_merge(loaded, chosen)


class SettingsFileSource(YamlConfigSettingsSource):
    """A settings YAML file, ``FILE#VARIANT`` for the file with one of its variants deep-merged over it. Read with
    the alias-refusing loader and a size bound; a missing or malformed file is a SettingsError naming the fix."""

    def __init__(
        self, settings_cls: type[BaseSettings], replaced: ReplacedMaps, config_file: str | os.PathLike | None
    ) -> None:
        self.replaced = replaced
        path, self.variant = split_variant(config_file) if config_file else (None, None)
        if path is not None and not path.is_file():
            raise SettingsError(f"config file {str(path)!r} does not exist; pass an existing YAML file to --config")
        super().__init__(settings_cls, yaml_file=path)

    def _read_file(self, file_path: Path) -> dict[str, Any]:  # type: ignore[override] - always a local Path here
        what = f"config file {str(file_path)!r}"
        if file_path.stat().st_size > MAX_YAML_BYTES:
            raise SettingsError(
                f"{what} is {file_path.stat().st_size} bytes, more than the {MAX_YAML_BYTES} allowed for a settings "
                "file; check that --config names the settings YAML"
            )
        try:
            loaded = load_yaml(file_path.read_text(), what) or {}
        except yaml.YAMLError as exc:
            raise SettingsError(f"{what} is not valid YAML: {cut(str(exc))}") from None
        if not isinstance(loaded, dict):
            raise SettingsError(f"config file {str(file_path)!r} must hold a mapping of settings at the top level")
        return with_variant(loaded, self.variant, what)

    def __call__(self) -> dict[str, Any]:
        return self.replaced.below(super().__call__())
