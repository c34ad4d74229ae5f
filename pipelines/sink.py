"""Writing the corpus exactly once: workers write each shard under a hidden temporary name; the driver alone
renames it to its numbered name and records its clips; the manifest (and rejects table) is committed last.

With a held-out split (config `split`), the clips of test sources go to shards and a manifest of their own in
`test/` under the output, which training (it reads the output's top level) never sees; a source is wholly in one
split, so no source is in both.

A killed run leaves committed shards and hidden partial files. The next run deletes the partial files, recovers
the clips of every committed shard (from the manifest, or from the shards' json where the manifest had not been
committed yet) and skips them, so the final shards and manifest hold every clip exactly once.

The driver holds the manifest rows of every committed clip until the manifest is written: as Arrow tables beside
the set of clip ids, about 430 bytes a clip (0.9 GiB at 2K hours); as Python dicts they took 3.4 KB a clip, 7 GiB
(benchmarks/curation_memory.py).
"""

from __future__ import annotations

import io
import logging
import tarfile
import uuid
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.config import SplitConfig
from pipelines.record import Clip
from pipelines.schema import (
    JSON_KEY,
    MANIFEST_FILE,
    MANIFEST_SCHEMA,
    REJECTS_FILE,
    REJECTS_SCHEMA,
    ClipMetadata,
    RejectReason,
    manifest_row,
    parse_shard_name,
    shard_name,
)
from pipelines.storage import resolve
from platform_common.pause import pause_point
from platform_common.storage import write_atomically

logger = logging.getLogger(__name__)

_PARTIAL_SUFFIX = ".partial"
_TABLES_BEFORE_COMPACTING = 256
TRAIN_SPLIT, TEST_SPLIT = "train", "test"
TEST_DIR = "test"  # the held-out split's shards and manifest, under the output


def split_of(clip: Clip, split: SplitConfig) -> str:
    """The split of a clip's source: listed in `test_sources` (by name or path), or within `test_fraction` by its
    content hash (so every window of a source, and a copy of it under another name, lands in the same split)."""
    if clip.source in split.test_sources or PurePosixPath(clip.source).name in split.test_sources:
        return TEST_SPLIT
    if int(clip.source_hash[:8], 16) / 16**8 < split.test_fraction:
        return TEST_SPLIT
    return TRAIN_SPLIT


def split_location(output: str, split: str) -> str:
    """Where a split's shards and manifest live: the output itself for training, `test/` under it."""
    return output if split == TRAIN_SPLIT else f"{output.rstrip('/')}/{TEST_DIR}"


@dataclass
class WrittenShard:
    """A shard a worker wrote under a temporary name, waiting for the driver to commit it."""

    kind: str
    temporary_path: str
    metadata: dict[str, bytes]  # clip id -> json member
    split: str = TRAIN_SPLIT
    stage_seconds: dict[str, float] = field(default_factory=dict)  # worker seconds of its clips per stage


def _tar_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed mtime: the same clips give the same bytes
    archive.addfile(info, io.BytesIO(data))


def _shard_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for key, members in samples:
            for extension in sorted(members):
                _tar_member(archive, f"{key}.{extension}", members[extension])
    return buffer.getvalue()


def _read_samples(data: bytes) -> dict[str, dict[str, bytes]]:
    """clip id -> {extension: bytes} of a shard."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as archive:
        for member in archive:
            key, _, extension = member.name.partition(".")
            samples.setdefault(key, {})[extension] = archive.extractfile(member).read()
    return samples


class ShardWriter:
    """map_batches task: writes a batch's accepted clips into one temporary shard per kind; passes rejects on."""

    name = "write"
    num_cpus = 0.5

    def __init__(self, output: str, split: SplitConfig | None = None) -> None:
        self.output = output
        self.split = split or SplitConfig()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        groups: dict[tuple[str, str], list[Clip]] = {}
        results: list[object] = []
        for clip in batch["clip"]:
            if clip.rejected:
                results.append(clip.reject_row())
            else:
                groups.setdefault((split_of(clip, self.split), clip.kind), []).append(clip)
        for (split, kind), clips in groups.items():
            fs, root = resolve(split_location(self.output, split))
            fs.create_dir(root, recursive=True)
            temporary = f"{root}/.{kind}-{uuid.uuid4().hex}.tar{_PARTIAL_SUFFIX}"
            with fs.open_output_stream(temporary) as stream:
                stream.write(_shard_bytes([(clip.clip_id, clip.sample) for clip in clips]))
            metadata = {clip.clip_id: clip.sample[JSON_KEY] for clip in clips}
            seconds: dict[str, float] = {}
            for clip in clips:
                for stage, value in clip.stage_seconds.items():
                    seconds[stage] = seconds.get(stage, 0.0) + value
            results.append(WrittenShard(kind, temporary, metadata, split, seconds))
        output = np.empty(len(results), dtype=object)
        output[:] = results
        return {"result": output}


class CorpusSink:
    """The driver's side: recovers what earlier runs committed, commits shards in order, writes the tables."""

    def __init__(self, output: str) -> None:
        self.fs, self.root = resolve(output)
        self.fs.create_dir(self.root, recursive=True)
        self.clip_ids: set[str] = set()  # committed
        self.manifest_tables: list[pa.Table] = []  # their manifest rows, a table per commit, compacted now and then
        self.rejects: list[dict] = []
        self.next_index: dict[str, int] = {}
        self.committed_shards = 0
        self._recover()

    @property
    def done_clip_ids(self) -> frozenset[str]:
        """Clips a rerun skips: committed ones, and ones an earlier run rejected for what they are (a clip id names
        content and window, so they would be rejected again). Clips that failed with an error are retried."""
        rejected = {row["clip_id"] for row in self.rejects if row["clip_id"] and row["reason"] != RejectReason.ERROR}
        return frozenset(self.clip_ids) | frozenset(rejected)

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _file_names(self) -> set[str]:
        files = self.fs.get_file_info(pafs.FileSelector(self.root))
        return {file.base_name for file in files if file.type == pafs.FileType.File}

    def _delete_partial_files(self) -> None:
        """Shards whose writer or driver died before the commit; their clips are written again."""
        for name in self._file_names():
            if name.startswith(".") and name.endswith(_PARTIAL_SUFFIX):
                self.fs.delete_file(self._path(name))

    def _record(self, table: pa.Table) -> None:
        """Keeps committed clips' manifest rows."""
        self.manifest_tables.append(table)
        self.clip_ids.update(table.column("clip_id").to_pylist())
        if len(self.manifest_tables) >= _TABLES_BEFORE_COMPACTING:  # each small table has its own overhead
            self.manifest_tables = [pa.concat_tables(self.manifest_tables).combine_chunks()]

    def _recover(self) -> None:
        self._delete_partial_files()
        names = self._file_names()
        listed: set[str] = set()
        if MANIFEST_FILE in names:
            table = pq.read_table(self._path(MANIFEST_FILE), filesystem=self.fs, schema=MANIFEST_SCHEMA)
            self._record(table)
            listed = set(table.column("shard").to_pylist())
        if REJECTS_FILE in names:
            self.rejects = pq.read_table(self._path(REJECTS_FILE), filesystem=self.fs).to_pylist()
        for name in sorted(names):
            parsed = parse_shard_name(name)
            if parsed is None:
                continue
            kind, index = parsed
            self.next_index[kind] = max(self.next_index.get(kind, 0), index + 1)
            if name not in listed:
                # Committed after the last manifest: its clips are done all the same.
                with self.fs.open_input_stream(self._path(name)) as stream:
                    samples = _read_samples(stream.read())
                rows = [
                    manifest_row(ClipMetadata.model_validate_json(members[JSON_KEY]), key, name)
                    for key, members in samples.items()
                ]
                self._record(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))
        if self.clip_ids:
            logger.info("resuming: %d clips already committed in %s", len(self.clip_ids), self.root)

    def commit(self, shard: WrittenShard) -> None:
        """Give a temporary shard its numbered name and record its clips (clips already committed are dropped)."""
        fresh = {key: meta for key, meta in shard.metadata.items() if key not in self.clip_ids}
        if not fresh:
            self.fs.delete_file(shard.temporary_path)
            return
        if len(fresh) < len(shard.metadata):
            # The same content listed twice (a copied file) gives the same clip ids: keep the first copy only.
            with self.fs.open_input_stream(shard.temporary_path) as stream:
                samples = _read_samples(stream.read())
            with self.fs.open_output_stream(shard.temporary_path) as stream:
                stream.write(_shard_bytes([(key, samples[key]) for key in fresh]))
        index = self.next_index.get(shard.kind, 0)
        name = shard_name(shard.kind, index)
        self.fs.move(shard.temporary_path, self._path(name))
        self.next_index[shard.kind] = index + 1
        rows = [manifest_row(ClipMetadata.model_validate_json(meta), key, name) for key, meta in fresh.items()]
        self._record(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))
        self.committed_shards += 1
        logger.info("committed %s (%d clips; %d clips in the corpus)", name, len(fresh), len(self.clip_ids))
        pause_point("curation-shard-committed")

    def reject(self, row: dict) -> None:
        self.rejects.append(row)

    def finish(self) -> tuple[pa.Table, pa.Table]:
        """Write rejects.parquet, then manifest.parquet last; return both tables."""
        self._delete_partial_files()  # from workers killed during this run (their tasks were retried)
        unique: dict[tuple, dict] = {}
        for row in self.rejects:
            # A rerun rejects the same inputs again; a clip rejected once and committed later is no reject.
            if row["clip_id"] not in self.clip_ids:
                unique[(row["input"], row["clip_id"], row["stage"], row["reason"])] = row
        rejects = pa.Table.from_pylist(list(unique.values()), schema=REJECTS_SCHEMA)
        manifest = pa.concat_tables([MANIFEST_SCHEMA.empty_table(), *self.manifest_tables])
        manifest = manifest.sort_by([("shard", "ascending"), ("clip_id", "ascending")])
        for name, table in ((REJECTS_FILE, rejects), (MANIFEST_FILE, manifest)):
            buffer = pa.BufferOutputStream()
            pq.write_table(table, buffer)
            write_atomically(self.fs, self._path(name), buffer.getvalue().to_pybytes())
        return manifest, rejects
