"""What every settings module shares: the error, the section base class, bounds and the model-name type."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict

# Finest patch resolution accepted: slide scanners stop near 0.1 µm/px (100x oil), so a finer target only upsamples,
# and the grid of a slide grows with (patch_px x target_mpp)^-2: 1e-6 µm/px would be ~10^11 cells of one slide.
MIN_TARGET_MPP = 0.05
MAX_SEED = 2**32 - 1  # numpy, torch and the OpenAI-compatible servers all take a 32-bit unsigned seed
MAX_SLIDE_MPP = 100.0  # a slide coarser than 100 µm/px holds no cells worth a caption
MAX_YAML_BYTES = 2**20  # a settings file (or prompts file) larger than this is refused before it is parsed
MAX_ERRORS_SHOWN = 10  # one settings error lists at most this many fields


def multiples_near(value: int, factor: int) -> str:
    """The multiples of ``factor`` on either side of ``value`` (the nearest positive ones), for an error's fix."""
    below = value - value % factor
    return " or ".join(str(v) for v in (below, below + factor) if v > 0)


def _blank_is_unset(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value


# A model given as "" (``--set agents.describe.model=``) means unset, as null does; never the current folder.
ModelName = Annotated[str | None, BeforeValidator(_blank_is_unset)]


class SettingsError(ValueError):
    """A setting is wrong; raised before any work starts."""


class Section(BaseModel):
    """The base of every settings section: an unknown key is refused, an assignment is validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
