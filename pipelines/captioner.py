"""A vision-language captioner: any transformers image-text-to-text model from a local path (BLIP-style
captioners, or chat models such as LLaVA and Qwen2-VL given a prompt), on the GPU its actor was given."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from pipelines.config import CaptionsConfig


class Captioner:
    """Holds the model; called on one RGB frame [H, W, 3] uint8, returns its caption."""

    def __init__(self, config: CaptionsConfig) -> None:
        self.config = config
        on_gpu = config.num_gpus > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if on_gpu else "cpu")
        self.processor = AutoProcessor.from_pretrained(config.model_path)
        self.model = AutoModelForImageTextToText.from_pretrained(
            config.model_path, dtype=torch.bfloat16 if on_gpu else torch.float32
        )
        self.model.to(self.device).eval()
        # Chat models answer an instruction; BLIP-style captioners describe the image as it is.
        self.chat = getattr(self.processor, "chat_template", None) is not None
        self.source = f"model:{Path(config.model_path).name}"  # the manifest's caption_source

    @torch.inference_mode()
    def __call__(self, frame: np.ndarray) -> str:
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
