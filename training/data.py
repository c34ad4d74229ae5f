"""Training batches streamed from the curated webdataset shards (the format of pipelines/schema.py).

Every (training worker, loader process) pair is one stream. The shards of each source (AI2V: the configured talking
kinds; I2V: the multi-event kind) are split between the streams, a shard among several streams when there are fewer
shards than streams (each then keeps every n-th sample), so the streams partition the corpus. Each stream loops over
its part epoch after epoch: shard order and a shuffle buffer are seeded by (seed, source, stream, epoch). The two
sources are interleaved at the configured I2V ratio, clips are decoded (video scaled to the training size, wav2vec
windows, person regions from the metadata) and grouped into batches of one resolution.

The data cursor is, per stream and source, the epoch of the latest trained sample and the clip ids trained in it.
A resumed stream replays that epoch without those clips, so no clip is trained twice within an epoch; clips of an
older epoch still waiting in a resolution bucket at the checkpoint are not replayed.

When the run resumes with another number of streams (an elastic worker group that shrank or grew, other loader
processes), the shards split differently: the cursors of all the old streams become one `StreamSplit`, which says
how many times each clip was trained (its old stream's epoch, one more if it was trained in it). A new stream starts
at the least of those epochs and trains a clip in epoch e only if it was trained fewer than e + 1 times, so every clip
is still trained exactly once per epoch across the resize. Splits stay in the cursor until every stream is past them.
"""

from __future__ import annotations

import io
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import cv2
import decord
import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from pydantic import ValidationError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from multitalk_model.config import MultiTalkConfig
from multitalk_model.faces import Face
from multitalk_model.regions import Box, locate_persons, region_masks
from multitalk_model.wav2vec import audio_windows
from pipelines.schema import JSON_KEY, MP4_KEY, WAV2VEC_KEY, ClipMetadata, parse_shard_name
from training.config import DataConfig

logger = logging.getLogger(__name__)

AI2V, I2V = "ai2v", "i2v"
SIZE_MULTIPLE = 16  # VAE stride 8 x patch 2: every side must split into whole tokens
MAX_DECODE_FAILURES = 100  # clips in a row that fail to decode before the stream gives up


@dataclass(frozen=True)
class ShardPart:
    """The samples of one shard a stream reads: those whose index in the shard is `offset` modulo `every`."""

    url: str
    every: int = 1
    offset: int = 0


@dataclass
class SourceCursor:
    """Where a stream is in one source: the epoch of the latest trained clip and the clips trained in it."""

    epoch: int = 0
    keys: set[str] = field(default_factory=set)


@dataclass
class ClipBatch:
    """One micro-batch, all clips at one resolution. Persons beyond a clip's own are zero audio streams."""

    keys: list[str]
    epochs: list[int]
    sources: list[str]  # AI2V or I2V per clip
    stream: int  # the stream that produced it (for the data cursor)
    video: torch.Tensor  # uint8 [B, F, H, W, 3]
    audio: torch.Tensor  # float16 [B, P, F, window, layers, channels]
    audio_streams: torch.Tensor  # long [B]: the clip's persons with audio (0 for I2V clips)
    region_masks: torch.Tensor  # float32 [B, P + 1, H / 8, W / 8]: person regions, then the background
    captions: list[str | None]

    def __len__(self) -> int:
        return len(self.keys)


def _list_shards(root: str | Path, kinds: list[str]) -> list[str]:
    """The committed shards of the given kinds in a corpus folder, in name order."""
    names = sorted(path.name for path in Path(root).iterdir() if path.is_file())
    return [str(Path(root) / name) for name in names if (parsed := parse_shard_name(name)) and parsed[0] in kinds]


def split_shards(shards: list[str], stream: int, num_streams: int) -> list[ShardPart]:
    """This stream's parts of the shards: the streams together read every sample exactly once."""
    if not shards:
        return []
    if len(shards) >= num_streams:
        return [ShardPart(url) for url in shards[stream::num_streams]]
    # Fewer shards than streams: stream s reads shard s mod N, sharing it with the other streams of that shard.
    shard = stream % len(shards)
    sharing = len(range(shard, num_streams, len(shards)))
    return [ShardPart(shards[shard], every=sharing, offset=stream // len(shards))]


def stream_of_sample(shards: list[str], url: str, index: int, num_streams: int) -> int:
    """The stream that split_shards gives sample `index` of shard `url` to."""
    shard = shards.index(url)
    if len(shards) >= num_streams:
        return shard % num_streams
    sharing = len(range(shard, num_streams, len(shards)))
    return shard + index % sharing * len(shards)


def _training_size(height: int, width: int, max_area: int | None) -> tuple[int, int]:
    """The (height, width) a clip trains at: scaled down to max_area if larger, sides multiples of 16."""
    scale = min(1.0, math.sqrt(max_area / (height * width))) if max_area else 1.0
    return (
        max(SIZE_MULTIPLE, int(height * scale) // SIZE_MULTIPLE * SIZE_MULTIPLE),
        max(SIZE_MULTIPLE, int(width * scale) // SIZE_MULTIPLE * SIZE_MULTIPLE),
    )


def interleave(ai2v: Iterator, i2v: Iterator | None, i2v_ratio: float) -> Iterator:
    """AI2V and I2V items in the exact ratio over every window: item n is I2V when floor(n r) steps up."""
    for index in count():
        take_i2v = i2v is not None and math.floor((index + 1) * i2v_ratio) > math.floor(index * i2v_ratio)
        yield next(i2v if take_i2v else ai2v)


def _shuffle_buffer(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Items in a random order that never holds more than `size` of them."""
    buffer: list = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            index = rng.randrange(len(buffer))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


@dataclass
class _Clip:
    key: str
    epoch: int
    source: str
    metadata: ClipMetadata
    members: dict[str, bytes]
    url: str  # its shard
    index: int  # its place in the shard


@dataclass
class StreamSplit:
    """The data cursors of all streams of an earlier split of the corpus (before a resize): how often each clip was
    trained. A stream without a cursor trained nothing."""

    num_streams: int
    streams: dict[int, dict[str, SourceCursor]]

    def times_trained(self, clip: _Clip, shards: list[str]) -> int:
        stream = stream_of_sample(shards, clip.url, clip.index, self.num_streams)
        cursor = self.streams.get(stream, {}).get(clip.source, SourceCursor())
        return cursor.epoch + (clip.key in cursor.keys)

    def least_trained(self, source: str) -> int:
        """Times every clip of the source was trained at least."""
        return min(self.streams.get(stream, {}).get(source, SourceCursor()).epoch for stream in range(self.num_streams))

    def most_trained(self) -> int:
        """Times a clip of any source was trained at most."""
        return max(
            (c.epoch + bool(c.keys) for sources in self.streams.values() for c in sources.values()),
            default=0,
        )


class ClipStream(IterableDataset):
    """The batches of one training worker; each loader process of it is a stream of its own."""

    def __init__(
        self,
        config: DataConfig,
        architecture: MultiTalkConfig,
        micro_batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        cursor: dict[int, dict[str, SourceCursor]] | None = None,
    ) -> None:
        self.config = config
        self.architecture = architecture
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.cursor = cursor or {}
        self.earlier: list[StreamSplit] = []  # splits before resizes (CursorTracker.earlier)
        self.shards = {AI2V: _list_shards(config.path, config.ai2v_kinds)}
        if not self.shards[AI2V]:
            raise FileNotFoundError(f"{config.path}: no shards of kinds {config.ai2v_kinds} (data.ai2v_kinds)")
        if config.i2v_ratio > 0:
            self.shards[I2V] = _list_shards(config.path, [config.i2v_kind])
            if not self.shards[I2V]:
                raise FileNotFoundError(
                    f"{config.path}: no {config.i2v_kind} shards, but data.i2v_ratio is {config.i2v_ratio}"
                )

    @property
    def num_streams(self) -> int:
        return self.world_size * max(1, self.config.num_workers)

    @property
    def own_streams(self) -> range:
        """The streams of this training worker, one per loader process."""
        per_worker = max(1, self.config.num_workers)
        return range(self.rank * per_worker, (self.rank + 1) * per_worker)

    def __iter__(self) -> Iterator[ClipBatch]:
        info = get_worker_info()
        stream = self.own_streams[info.id if info else 0]
        sources = {
            source: self._source_clips(source, stream, self.cursor.get(stream, {}).get(source, SourceCursor()))
            for source in self.shards
        }
        clips = interleave(sources[AI2V], sources.get(I2V), self.config.i2v_ratio)
        buckets: dict[tuple[int, int], list[dict]] = {}
        failures = 0
        for clip in clips:
            try:
                sample = self._decode(clip)
            except (RuntimeError, ValueError, KeyError, decord.DECORDError) as error:
                logger.warning("skipping clip %s: %s: %s", clip.key, type(error).__name__, error)
                failures += 1
                if failures > MAX_DECODE_FAILURES:
                    raise RuntimeError(f"stream {stream}: {failures} clips in a row failed to decode") from error
                continue
            failures = 0
            bucket = buckets.setdefault(sample["video"].shape[1:3], [])
            bucket.append(sample)
            if len(bucket) == self.micro_batch_size:
                yield self._collate(bucket, stream)
                bucket.clear()

    def _source_clips(self, source: str, stream: int, cursor: SourceCursor) -> Iterator[_Clip]:
        """This stream's usable clips of one source, epoch after epoch from the cursor's, shuffled."""
        shards = self.shards[source]
        parts = split_shards(shards, stream, self.num_streams)
        start = max([cursor.epoch, *(split.least_trained(source) for split in self.earlier)])
        for epoch in count(start):
            trained = cursor.keys if epoch == cursor.epoch else set()
            rng = random.Random(f"{self.seed}:{source}:{stream}:{epoch}")
            order = rng.sample(parts, len(parts))
            usable = 0

            def due(clip: _Clip, epoch: int = epoch, trained: set[str] = trained) -> bool:
                """Whether the clip is still to train in this epoch (trained fewer than epoch + 1 times)."""
                nonlocal usable
                usable += 1
                return clip.key not in trained and all(
                    split.times_trained(clip, shards) <= epoch for split in self.earlier
                )

            clips = (clip for clip in self._read(order, source, epoch) if due(clip))
            yield from _shuffle_buffer(clips, self.config.shuffle_buffer, rng)
            if not usable:
                raise RuntimeError(
                    f"stream {stream} of {self.num_streams} has no usable {source} clips in {self.config.path} "
                    f"(clips of at least {self.config.num_frames} frames with audio for AI2V)"
                )

    def _read(self, parts: list[ShardPart], source: str, epoch: int) -> Iterator[_Clip]:
        for part in parts:
            samples = wds.WebDataset(part.url, shardshuffle=False, nodesplitter=None, workersplitter=None)
            for index, members in enumerate(samples):
                key = members["__key__"]
                if index % part.every != part.offset:
                    continue
                try:
                    metadata = ClipMetadata.model_validate_json(members[JSON_KEY])
                except (KeyError, ValidationError) as error:
                    logger.warning("skipping clip %s of %s: bad metadata (%s)", key, part.url, error)
                    continue
                if self._usable(metadata, members, source):
                    yield _Clip(key, epoch, source, metadata, members, part.url, index)

    def _usable(self, metadata: ClipMetadata, members: dict, source: str) -> bool:
        if metadata.num_frames < self.config.num_frames or MP4_KEY not in members:
            return False
        return source == I2V or (WAV2VEC_KEY in members and len(metadata.persons) >= 1)

    def _decode(self, clip: _Clip) -> dict:
        """Video at the training size, wav2vec windows and person regions of one clip (numpy)."""
        metadata, frames = clip.metadata, self.config.num_frames
        height, width = _training_size(metadata.height, metadata.width, self.config.max_area)
        reader = decord.VideoReader(io.BytesIO(clip.members[MP4_KEY]), num_threads=1)
        video = reader.get_batch(list(range(frames))).asnumpy()
        if video.shape[1:3] != (height, width):
            # Area averaging, as the curation scales clips down (decord's own resize is unreliable from memory).
            video = np.stack([cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA) for frame in video])

        audio, boxes = None, []
        if clip.source == AI2V:
            features = torch.from_numpy(np.load(io.BytesIO(clip.members[WAV2VEC_KEY])))  # [P, frames, L, C]
            expected = (len(metadata.persons), metadata.num_frames, self.architecture.audio_layers)
            if tuple(features.shape[:3]) != expected or features.shape[3] != self.architecture.audio_channels:
                raise ValueError(f"wav2vec features of shape {tuple(features.shape)} do not fit {expected} x C")
            # Windows over the whole clip, then cropped: a frame's window reaches past the crop as at inference.
            window = self.architecture.audio_window
            audio = torch.stack([audio_windows(person.float(), window)[:frames] for person in features]).half()
            scale_x, scale_y = width / metadata.width, height / metadata.height
            boxes = [
                (box[0] * scale_x, box[1] * scale_y, box[2] * scale_x, box[3] * scale_y)
                for box in (person.bbox_xyxy for person in metadata.persons)
            ]
        return {
            "key": clip.key,
            "epoch": clip.epoch,
            "source": clip.source,
            "video": video,
            "audio": audio,
            "regions": _person_regions(boxes, video[0]),
            "caption": metadata.caption,
        }

    def _collate(self, samples: list[dict], stream: int) -> ClipBatch:
        persons = max(1, max(len(s["regions"]) for s in samples))
        frames, height, width = samples[0]["video"].shape[:3]
        arch = self.architecture
        audio = torch.zeros(len(samples), persons, frames, arch.audio_window, arch.audio_layers, arch.audio_channels)
        audio = audio.half()
        masks = torch.zeros(len(samples), persons + 1, height, width)
        streams = torch.zeros(len(samples), dtype=torch.long)
        for index, sample in enumerate(samples):
            if sample["audio"] is not None:
                audio[index, : len(sample["audio"])] = sample["audio"]
                streams[index] = len(sample["audio"])
            if len(sample["regions"]) > 1:
                pixel_masks = torch.from_numpy(region_masks(sample["regions"], (height, width)))
                masks[index, : len(sample["regions"])] = pixel_masks[:-1]
                masks[index, -1] = pixel_masks[-1]
            else:  # one person: the whole frame (no localisation runs)
                masks[index] = 1
        return ClipBatch(
            keys=[s["key"] for s in samples],
            epochs=[s["epoch"] for s in samples],
            sources=[s["source"] for s in samples],
            stream=stream,
            video=torch.from_numpy(np.stack([s["video"] for s in samples])),
            audio=audio,
            audio_streams=streams,
            # The latent grid, nearest as the reference does for its masks.
            region_masks=F.interpolate(masks, scale_factor=1 / 8, mode="nearest"),
            captions=[s["caption"] for s in samples],
        )


class _KnownFaces:
    """A face detector that answers with the faces the curation recorded (the FaceDetector protocol)."""

    def __init__(self, boxes: list[Box]) -> None:
        self.faces = [Face(box=tuple(box), score=1.0) for box in boxes]

    def detect(self, image: np.ndarray) -> list[Face]:
        return self.faces


def _person_regions(face_boxes: list[Box], first_frame: np.ndarray) -> list[Box]:
    """Person regions grown from the recorded faces exactly as generation grows detected ones (left to right)."""
    if len(face_boxes) < 2:
        return list(face_boxes)
    regions, _ = locate_persons(first_frame, len(face_boxes), _KnownFaces(face_boxes))
    return regions


class CursorTracker:
    """The data cursor of one training worker, advanced by the batches it trains on."""

    def __init__(
        self,
        num_streams: int,
        streams: dict[int, dict[str, SourceCursor]] | None = None,
        earlier: list[StreamSplit] | None = None,
    ) -> None:
        self.num_streams = num_streams
        self.streams = streams or {}
        self.earlier = earlier or []

    def advance(self, batch: ClipBatch) -> None:
        """Records the clips of a trained batch."""
        sources = self.streams.setdefault(batch.stream, {})
        for key, epoch, source in zip(batch.keys, batch.epochs, batch.sources, strict=False):
            cursor = sources.setdefault(source, SourceCursor(epoch=epoch))
            if epoch > cursor.epoch:
                sources[source] = cursor = SourceCursor(epoch=epoch)
            if epoch == cursor.epoch:
                cursor.keys.add(key)

    def state_dict(self) -> dict:
        return {
            "num_streams": self.num_streams,
            "streams": _streams_state(self.streams),
            "earlier": [{"num_streams": s.num_streams, "streams": _streams_state(s.streams)} for s in self.earlier],
        }

    @classmethod
    def resume(cls, states: list[dict], num_streams: int, own_streams: range) -> CursorTracker:
        """This worker's cursor from the saved cursors of all workers of the checkpoint.

        With the same number of streams each stream continues its own cursor. After a resize the old streams'
        cursors together become one more earlier split (earlier splits every old stream is past are dropped)."""
        earlier = [
            StreamSplit(split["num_streams"], _streams_from_state(split["streams"]))
            for split in states[0].get("earlier", [])
        ]
        saved = {stream: c for state in states for stream, c in _streams_from_state(state["streams"]).items()}
        if states[0]["num_streams"] == num_streams:
            return cls(num_streams, {stream: saved[stream] for stream in own_streams if stream in saved}, earlier)
        logger.info("the data cursor was saved for %d streams, this run has %d", states[0]["num_streams"], num_streams)
        resized = StreamSplit(states[0]["num_streams"], saved)
        least = min((resized.least_trained(source) for sources in saved.values() for source in sources), default=0)
        return cls(num_streams, {}, [*(s for s in earlier if s.most_trained() > least), resized])


def _streams_state(streams: dict[int, dict[str, SourceCursor]]) -> dict:
    return {
        str(stream): {source: {"epoch": c.epoch, "keys": sorted(c.keys)} for source, c in sources.items()}
        for stream, sources in streams.items()
    }


def _streams_from_state(state: dict) -> dict[int, dict[str, SourceCursor]]:
    return {
        int(stream): {source: SourceCursor(c["epoch"], set(c["keys"])) for source, c in sources.items()}
        for stream, sources in state.items()
    }


def build_loader(dataset: ClipStream, config: DataConfig) -> DataLoader:
    """Loader processes that decode and batch ahead of training; batches come out whole (batch_size=None)."""
    workers = config.num_workers
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=config.prefetch_batches if workers else None,
        persistent_workers=workers > 0,
    )
