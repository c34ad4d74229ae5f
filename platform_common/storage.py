"""Writing files through pyarrow.fs (local paths, s3://, gs://, ...) so that readers never see a partial one."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    import pyarrow.fs as pafs


@contextmanager
def atomic_output(fs: pafs.FileSystem, path: str) -> Iterator[BinaryIO]:
    """A stream to `path` that writes under a hidden temporary name beside it, moved into place when the block
    ends without error: readers see the whole file or none."""
    directory, name = path.rsplit("/", 1)
    temporary = f"{directory}/.{name}.{uuid.uuid4().hex}.partial"
    with fs.open_output_stream(temporary) as stream:
        yield stream
    fs.move(temporary, path)


def write_atomically(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Writes `data` to `path` through `atomic_output`."""
    with atomic_output(fs, path) as stream:
        stream.write(data)
