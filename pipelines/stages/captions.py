"""Stage 8: the clip's caption and where it came from: a vision-language model on the clip's middle frame when
`captions.model_path` is set (any transformers image-text-to-text model: BLIP-style captioners, or chat models such
as LLaVA and Qwen2-VL given `captions.prompt`), else the input manifest's. The image-to-video corpus (multi_event)
needs one."""

from __future__ import annotations

from pipelines.config import CurationConfig
from pipelines.record import Clip
from pipelines.schema import RejectReason
from pipelines.stages.base import Stage, clip_frames


class CaptionStage(Stage):
    """Fills `caption` and `caption_source` (manifest, none or model:<name>); rejects multi_event clips without a
    caption. An actor holding the model when one is configured, a light task otherwise."""

    name = "captions"
    num_cpus = 0.25  # without a model it only copies a field; captioner actors take the captions config's

    def __init__(self, config: CurationConfig) -> None:
        self.config = config.captions
        self.captioner = None
        if config.captions.model_path:
            # Imported only here: the model-less task (most runs) does not pay for importing torch and transformers.
            from pipelines.captioner import Captioner

            self.captioner = Captioner(config.captions)

    def process(self, clip: Clip) -> None:
        if clip.caption and (self.captioner is None or not self.config.replace_manifest):
            clip.caption_source = "manifest"
        elif self.captioner is not None:
            clip.caption = self.captioner(clip_frames(clip, clip.num_frames // 2, 1)[0]) or None
            clip.caption_source = self.captioner.source if clip.caption else "none"
        else:
            clip.caption_source = "none"
        if clip.kind == "multi_event" and not clip.caption:
            where = "the captioner gave none" if self.captioner is not None else "the input manifest has none"
            clip.reject(self.name, RejectReason.NO_CAPTION, f"multi_event clips need a caption; {where}")
