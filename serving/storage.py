"""The files of jobs (uploaded inputs, generated videos) under one root: a local directory or any pyarrow.fs URI.

    storage = Storage("s3://bucket/multitalk")       # or "/var/lib/multitalk/files"
    storage.upload(Path("video.mp4"), job_file(job_id, "video.mp4"))

Writes go to a temporary name first and are moved into place (platform_common.storage), so a reader never sees
half a file.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs

from platform_common.storage import atomic_output, write_atomically

_CHUNK_BYTES = 1 << 20
VIDEO_NAME = "video.mp4"  # a job's result, beside its inputs/
THUMBNAIL_NAME = "thumbnail.jpg"  # the result's first frame


def job_folder(job_id: str) -> str:
    """The storage key of the folder of a job's files."""
    return f"jobs/{job_id}"


def job_file(job_id: str, name: str) -> str:
    """The storage key of one of a job's files."""
    return f"{job_folder(job_id)}/{name}"


def uploaded_file(file_id: str) -> str:
    """The storage key of a file uploaded through /v1/files."""
    return f"files/{file_id}"


class Storage:
    """Files under a root directory of a pyarrow file system, addressed by relative keys ("jobs/<id>/video.mp4")."""

    def __init__(self, uri: str) -> None:
        if "://" in uri:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(uri).absolute())
        self.fs.create_dir(self.root, recursive=True)
        self.uri = uri

    def _path(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{key}"

    def upload(self, local: Path, key: str) -> None:
        """Copies a local file to key."""
        path = self._path(key)
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with open(local, "rb") as source, atomic_output(self.fs, path) as target:
            shutil.copyfileobj(source, target, _CHUNK_BYTES)

    def download(self, key: str, local: Path) -> None:
        """Copies key to a local file; FileNotFoundError names the key when it is missing."""
        try:
            source = self.fs.open_input_stream(self._path(key))
        except FileNotFoundError:
            raise FileNotFoundError(f"{key}: not in the storage at {self.uri}") from None
        local.parent.mkdir(parents=True, exist_ok=True)
        with source, open(local, "wb") as target:
            shutil.copyfileobj(source, target, _CHUNK_BYTES)

    def write_bytes(self, key: str, data: bytes) -> None:
        """Stores data at key (replacing what was there)."""
        path = self._path(key)
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        write_atomically(self.fs, path, data)

    def read_bytes(self, key: str) -> bytes:
        """The content of key; FileNotFoundError names the key when it is missing."""
        try:
            with self.fs.open_input_stream(self._path(key)) as source:
                return source.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{key}: not in the storage at {self.uri}") from None

    def names(self, folder: str) -> list[str]:
        """Names of the files directly in a folder, sorted (not those still being written); none when the folder
        does not exist."""
        infos = self.fs.get_file_info(pafs.FileSelector(self._path(folder), allow_not_found=True))
        return sorted(
            info.base_name for info in infos if info.type == pafs.FileType.File and not info.base_name.startswith(".")
        )

    def size(self, key: str) -> int | None:
        """Bytes of key, or None when it does not exist."""
        info = self.fs.get_file_info(self._path(key))
        return info.size if info.type == pafs.FileType.File else None

    def chunks(self, key: str, start: int = 0, length: int | None = None) -> Iterator[bytes]:
        """`length` bytes of key from `start` (all to the end by default), a chunk at a time (for HTTP)."""
        with self.fs.open_input_file(self._path(key)) as source:
            source.seek(start)
            left = source.size() - start if length is None else length
            while left > 0 and (chunk := source.read(min(_CHUNK_BYTES, left))):
                left -= len(chunk)
                yield chunk

    def delete(self, key: str) -> None:
        """Removes a file, or a folder of files (a job's), when it exists."""
        info = self.fs.get_file_info(self._path(key))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self._path(key))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self._path(key))
