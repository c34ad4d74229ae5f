"""Run configs as YAML files validated into typed pydantic models (curation, training and evaluation share this
reader): a file that cannot be used fails at start with one message naming the file and every bad field.

Any entry point takes `--set key.sub=value` overrides of its config, validated like the file:

    parser = argparse.ArgumentParser()
    add_set_option(parser)
    args = parser.parse_args()
    config = read_config(args.config, MyConfig, parse_sets(args.sets))
    write_resolved_config(config, config.output)        # what the run really used, beside its output
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
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


def add_set_option(parser: argparse.ArgumentParser) -> None:
    """Adds `--set KEY.SUB=VALUE` (repeatable) to an entry point; read it back with parse_sets(args.sets)."""
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY.SUB=VALUE",
        help="override a config field (dotted path; the value is read as YAML: 0, 2e-5, true, [1, 2], text); "
        "repeatable; validated like the file",
    )


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """`KEY.SUB=VALUE` strings -> {dotted field name: value}, each value read as a YAML scalar or flow collection."""
    overrides: dict[str, Any] = {}
    for item in items:
        name, equals, text = item.partition("=")
        name = name.strip()
        if not equals or not name or any(not part for part in name.split(".")):
            raise ConfigError(f"--set {item!r}: expected KEY.SUB=VALUE, e.g. --set data.i2v_ratio=0")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({error})") from error
        if value is None:  # read_config skips None (an option not given); a field is emptied in the file instead
            raise ConfigError(f"--set {item!r}: null cannot be set on the command line; edit the config file")
        overrides[name] = value
    return overrides


def write_resolved_config(config: BaseModel, output: str, name: str = "resolved_config.yaml") -> str:
    """Writes the config a run really uses (file, flags and --set overrides merged, defaults filled in) into its
    output folder or URI; returns where."""
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    if "://" in output:
        import pyarrow.fs as pafs  # only for object-store outputs; local runs need no pyarrow here

        fs, root = pafs.FileSystem.from_uri(output)
        fs.create_dir(root, recursive=True)
        target = f"{root.rstrip('/')}/{name}"
        with fs.open_output_stream(target) as stream:
            stream.write(text.encode())
        return f"{output.rstrip('/')}/{name}"
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return str(folder / name)


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
