"""Stage 8: the clip's caption and where it came from; the image-to-video corpus (multi_event) needs one."""

from __future__ import annotations

from pipelines.record import Clip
from pipelines.schema import RejectReason
from pipelines.stages.base import Stage


class CaptionStage(Stage):
    """Takes the input manifest's caption; rejects multi_event clips without one."""

    name = "captions"
    num_cpus = 0.25


    def process(self, clip: Clip) -> None:
        clip.caption_source = "manifest" if clip.caption else "none"
        if clip.kind == "multi_event" and not clip.caption:
            clip.reject(self.name, RejectReason.NO_CAPTION, "multi_event clips need a caption in the input manifest")
