"""Stage 8: the clip's caption and where it came from: a vision-language model on the clip's middle frame when
`captions.model_path` is set (any transformers image-text-to-text model: BLIP-style captioners, or chat models such
as LLaVA and Qwen2-VL given `captions.prompt`), else the input manifest's. The image-to-video corpus (multi_event)
needs one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

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
        self.model = None
        if config.captions.model_path:
            # Imported only here: the model-less task (most runs) does not pay for importing transformers.
            from transformers import AutoModelForImageTextToText, AutoProcessor

            on_gpu = config.captions.num_gpus > 0 and torch.cuda.is_available()
            self.device = torch.device("cuda" if on_gpu else "cpu")
            self.processor = AutoProcessor.from_pretrained(config.captions.model_path)
            self.model = AutoModelForImageTextToText.from_pretrained(
                config.captions.model_path, dtype=torch.bfloat16 if on_gpu else torch.float32
            )
            self.model.to(self.device).eval()
            # Chat models answer an instruction; BLIP-style captioners describe the image as it is.
            self.chat = getattr(self.processor, "chat_template", None) is not None
            self.source = f"model:{Path(config.captions.model_path).name}"

    def process(self, clip: Clip) -> None:
        if clip.caption and (self.model is None or not self.config.replace_manifest):
            clip.caption_source = "manifest"
        elif self.model is not None:
            clip.caption = self.caption(clip_frames(clip, clip.num_frames // 2, 1)[0]) or None
            clip.caption_source = self.source if clip.caption else "none"
        else:
            clip.caption_source = "none"
        if clip.kind == "multi_event" and not clip.caption:
            where = "the captioner gave none" if self.model is not None else "the input manifest has none"
            clip.reject(self.name, RejectReason.NO_CAPTION, f"multi_event clips need a caption; {where}")

    @torch.inference_mode()
    def caption(self, frame: np.ndarray) -> str:
        """The model's caption of one RGB frame [H, W, 3] uint8."""
        image = Image.fromarray(frame)
        if self.chat:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.config.prompt}]}]
            prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            inputs = self.processor(images=[image], text=prompt, return_tensors="pt")
        else:
            inputs = self.processor(images=image, return_tensors="pt")
        inputs = inputs.to(self.device, dtype=self.model.dtype)
        output = self.model.generate(**inputs, max_new_tokens=self.config.max_new_tokens, do_sample=False)
        # Decoder-only chat models return the prompt before the answer.
        tokens = output[0, inputs["input_ids"].shape[1] :] if self.chat else output[0]
        return self.processor.decode(tokens, skip_special_tokens=True).strip()
