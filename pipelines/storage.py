"""Inputs and outputs through pyarrow.fs (local paths, s3://, gs://, ...): list the inputs, fetch a source to a
local file for decoding, and write files so that readers never see a partial one."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.schema import INPUT_KINDS

_MANIFEST_SUFFIXES = (".jsonl", ".csv", ".parquet")
_CACHE_DIR = Path(tempfile.gettempdir()) / "multitalk-curation-sources"


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The file system and path of a local path or URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    return pafs.FileSystem.from_uri(uri)


def _join(uri: str, relative: str) -> str:
    return f"{uri.rstrip('/')}/{relative}" if "://" in uri else str(Path(uri) / relative)


def list_inputs(uri: str, default_kind: str) -> list[dict]:
    """Rows {source, kind, caption}: every (non-hidden) file under a folder, or the rows of a manifest file."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {uri}: no such file or folder")
    if info.type == pafs.FileType.Directory:
        files = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        relative = sorted(
            os.path.relpath(file.path, path)
            for file in files
            if file.type == pafs.FileType.File and not any(part.startswith(".") for part in Path(file.path).parts)
        )
        return [{"source": _join(uri, name), "kind": default_kind, "caption": None} for name in relative]
    if not path.endswith(_MANIFEST_SUFFIXES):
        raise ValueError(f"input {uri}: a file input must be a manifest ({', '.join(_MANIFEST_SUFFIXES)})")
    return _read_manifest(uri, fs, path, default_kind)


def _read_manifest(uri: str, fs: pafs.FileSystem, path: str, default_kind: str) -> list[dict]:
    if path.endswith(".parquet"):
        rows = pq.read_table(path, filesystem=fs).to_pylist()
    else:
        with fs.open_input_stream(path) as stream:
            text = stream.read().decode()
        if path.endswith(".csv"):
            rows = list(csv.DictReader(io.StringIO(text)))
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    base = uri.rsplit("/", 1)[0] if "://" in uri else str(Path(path).parent)
    inputs = []
    for number, row in enumerate(rows, start=1):
        if not row.get("path"):
            raise ValueError(f"input manifest {uri}: row {number} has no 'path'")
        kind = row.get("kind") or default_kind
        if kind not in INPUT_KINDS:
            raise ValueError(
                f"input manifest {uri}: row {number}: kind {kind!r} is not one of {', '.join(INPUT_KINDS)}"
            )
        source = row["path"]
        if "://" not in source and not Path(source).is_absolute():
            source = _join(base, source)  # relative to the manifest's folder
        inputs.append({"source": source, "kind": kind, "caption": row.get("caption") or None})
    return inputs


def local_copy(uri: str) -> Path:
    """A local file with the source's content: the file itself when local, else a per-node cached download."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return Path(path)
    cached = _CACHE_DIR / hashlib.sha256(uri.encode()).hexdigest()[:32] / Path(path).name
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f".{cached.name}.{uuid.uuid4().hex}.partial")
        pafs.copy_files(path, str(partial), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        os.replace(partial, cached)
    return cached


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes: the content identity of a source."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomically(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write under a hidden temporary name, then move it into place: readers see the whole file or none."""
    directory, name = path.rsplit("/", 1)
    temporary = f"{directory}/.{name}.{uuid.uuid4().hex}.partial"
    with fs.open_output_stream(temporary) as stream:
        stream.write(data)
    fs.move(temporary, path)
