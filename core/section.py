"""The base of every configuration section: unknown keys are errors (the message names the key)."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")
