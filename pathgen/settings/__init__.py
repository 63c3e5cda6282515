"""The factory's settings: one model, one section per stage, each section in the module of its stage.

``pathgen.settings.loader`` builds them from defaults < YAML file < ``PATHGEN_*`` environment < ``--set key=value``
(see its docstring) through the pydantic-settings sources of ``pathgen.settings.sources``; the stage modules
(``slides``, ``agents``, ``clip``, ``llava``, ...) define the sections. Every public name is importable from
``pathgen.settings``.
"""

from pathgen.settings.agents import AgentsSettings, RoleSettings
from pathgen.settings.base import MAX_SEED, MAX_SLIDE_MPP, MAX_YAML_BYTES, MIN_TARGET_MPP, ModelName, SettingsError
from pathgen.settings.clip import ClipSettings, PairSetSettings, clip_batch_per_device
from pathgen.settings.evaluate import EvalSettings
from pathgen.settings.features import FeaturesSettings
from pathgen.settings.instruct import InstructSettings
from pathgen.settings.llava import LlavaSettings
from pathgen.settings.loader import (
    ALL_KEYS,
    ENV_PREFIX,
    MAP_KEYS,
    SCALAR_LIST_KEYS,
    load_settings,
    parse_assignments,
    run_settings,
)
from pathgen.settings.mil import MilSettings
from pathgen.settings.model import Settings
from pathgen.settings.review import ExportSettings, ServeSettings
from pathgen.settings.runs import CleanupSettings, ModelsSettings, PartsSettings, RetrySettings, S3Settings
from pathgen.settings.slides import (
    EmbeddingSettings,
    ExtractSettings,
    PatchSettings,
    QualitySettings,
    SelectionSettings,
    SlideSettings,
    TissueSettings,
)
from pathgen.settings.sources import NON_SETTING_ENV_VARS, VARIANTS_KEY
from pathgen.settings.yaml_text import load_yaml

__all__ = [
    "ALL_KEYS",
    "ENV_PREFIX",
    "MAP_KEYS",
    "MAX_SEED",
    "MAX_SLIDE_MPP",
    "MAX_YAML_BYTES",
    "MIN_TARGET_MPP",
    "NON_SETTING_ENV_VARS",
    "SCALAR_LIST_KEYS",
    "VARIANTS_KEY",
    "AgentsSettings",
    "CleanupSettings",
    "ClipSettings",
    "EmbeddingSettings",
    "EvalSettings",
    "ExportSettings",
    "ExtractSettings",
    "FeaturesSettings",
    "InstructSettings",
    "LlavaSettings",
    "MilSettings",
    "ModelName",
    "ModelsSettings",
    "PairSetSettings",
    "PartsSettings",
    "PatchSettings",
    "QualitySettings",
    "RetrySettings",
    "RoleSettings",
    "S3Settings",
    "SelectionSettings",
    "ServeSettings",
    "Settings",
    "SettingsError",
    "SlideSettings",
    "TissueSettings",
    "clip_batch_per_device",
    "load_settings",
    "load_yaml",
    "parse_assignments",
    "run_settings",
]
