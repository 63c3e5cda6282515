"""The whole settings model: one section per stage or concern, each defined in its own module, read from
pydantic-settings sources.

Precedence, lowest to highest: defaults < YAML file < ``PATHGEN_*`` environment < ``--set key=value`` (< keyword
arguments, for code that builds settings directly). ``pathgen.settings.loader.load_settings`` names the file, the
environment and the assignments of one build; a bare ``Settings()`` reads ``os.environ`` and no file.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from pathgen.settings.agents import AgentsSettings
from pathgen.settings.clip import ClipSettings
from pathgen.settings.evaluate import EvalSettings
from pathgen.settings.features import FeaturesSettings
from pathgen.settings.instruct import InstructSettings
from pathgen.settings.llava import LlavaSettings
from pathgen.settings.mil import MilSettings
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
from pathgen.settings.sources import (
    SETTINGS_INPUTS,
    AssignmentsSource,
    EnvironmentSource,
    ReplacedMaps,
    SettingsFileSource,
    SettingsInputs,
)


class Settings(BaseSettings):
    # Each section's default is an instance, so that pydantic-settings' nested_model_default_partial_update merges
    # a layer that sets one field of a section (agents.summarize.model) over the section's defaults.
    model_config = SettingsConfigDict(
        env_prefix="PATHGEN_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
        nested_model_default_partial_update=True,
    )

    store: str = Field("file://./store", description="fsspec URL of the store root")
    sources: list[str] = Field(default_factory=list)
    patch: PatchSettings = PatchSettings()
    tissue: TissueSettings = TissueSettings()
    quality: QualitySettings = QualitySettings()
    selection: SelectionSettings = SelectionSettings()
    embedding: EmbeddingSettings = EmbeddingSettings()
    agents: AgentsSettings = AgentsSettings()
    slides: SlideSettings = SlideSettings()
    extract: ExtractSettings = ExtractSettings()
    s3: S3Settings = S3Settings()
    retries: RetrySettings = RetrySettings()
    cleanup: CleanupSettings = CleanupSettings()
    parts: PartsSettings = PartsSettings()
    clip: ClipSettings = ClipSettings()
    llava: LlavaSettings = LlavaSettings()
    eval: EvalSettings = EvalSettings()
    instruct: InstructSettings = InstructSettings()
    features: FeaturesSettings = FeaturesSettings()
    mil: MilSettings = MilSettings()
    models: ModelsSettings = ModelsSettings()
    serve: ServeSettings = ServeSettings()
    export: ExportSettings = ExportSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Highest first: keyword arguments, ``--set``, ``PATHGEN_*`` variables, the YAML file (then the defaults,
        which pydantic-settings adds). No .env file and no secrets folder: credentials stay in the environment."""
        inputs = SETTINGS_INPUTS.get() or SettingsInputs()
        replaced = ReplacedMaps()
        return (
            init_settings,
            AssignmentsSource(settings_cls, replaced, inputs.assignments),
            EnvironmentSource(settings_cls, replaced, inputs.environ),
            SettingsFileSource(settings_cls, replaced, inputs.config_file),
        )
