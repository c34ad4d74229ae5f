"""Run configs as YAML files validated into typed pydantic models (curation and training share this reader): a
file that cannot be used fails at start with one message naming the file and every bad field."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and the field."""


class ConfigSection(BaseModel):
    """A part of a config: unknown fields are errors (a misspelt field must not fall back to its default)."""

    model_config = ConfigDict(extra="forbid")


Config = TypeVar("Config", bound=BaseModel)


def read_config(path: str | os.PathLike, model: type[Config], overrides: Mapping[str, Any] | None = None) -> Config:
    """Read `path` and validate it into `model`; `overrides` maps dotted field names (`data.path`) to values that
    replace the file's, skipping None (an option not given on the command line)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read the config ({error})") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of fields at the top level")
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        *sections, field = name.split(".")
        section = raw
        for key in sections:
            section = section.setdefault(key, {})
            if not isinstance(section, dict):
                raise ConfigError(f"{path}: {key}: expected a mapping of fields")
        section[field] = value
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in issue['loc']) or '(top level)'}: {issue['msg']}"
            for issue in error.errors()
        )
        raise ConfigError(f"{path}: {problems}") from error


def require(path: str | os.PathLike, fields: Mapping[str, Any]) -> None:
    """Fail naming the first of `fields` (dotted name -> value) that is empty."""
    for name, value in fields.items():
        if not value:
            raise ConfigError(f"{path}: {name}: required (in the config or on the command line)")


def absolute_location(location: str) -> str:
    """A local path made absolute (workers may start in another directory); a URI (s3://...) as it is."""
    return location if "://" in location else str(Path(location).expanduser().resolve())


def existing_local_path(
    config_path: str | os.PathLike, field: str, value: str, kind: Literal["directory", "file"]
) -> str:
    """`value` (of the dotted `field`) made absolute; fails naming the field unless it is an existing `kind`."""
    value = absolute_location(value)
    exists = Path.is_dir if kind == "directory" else Path.is_file
    if not exists(Path(value)):
        raise ConfigError(f"{config_path}: {field}: {value} is not a {kind}")
    return value
