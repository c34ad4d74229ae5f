"""Evaluation during training: every `evaluation.every` optimizer steps rank 0 generates a small fixed test set
with the current audio weights (under the configured protocol, usually few steps at a small size), scores it with
the quality metrics, and returns the means for the step's metrics (TensorBoard and metrics.jsonl as `eval/NAME`).
With `keep_best`, the audio weights of the best step by that metric are exported to OUTPUT/best/.

The transformer is the one being trained (ZeRO stage 1 or 2 keeps every weight whole on each rank), put in eval
mode for the generation; the other ranks go on to the next step and wait for rank 0 in its first collective.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from evaluation.clips import generate_clip, score_clip
from evaluation.stats import better_direction
from evaluation.testset import load_test_set
from multitalk_model.checkpoints import export_audio_weights
from multitalk_model.components import ConditionEncoders, MultiTalkComponents, load_scheduler
from multitalk_model.config import MultiTalkConfig
from multitalk_model.generation import MultiTalkPipeline
from multitalk_model.transformer import MultiTalkTransformer3DModel
from multitalk_model.wav2vec import Wav2VecEncoder
from training.config import EvaluationSettings

logger = logging.getLogger(__name__)

EVALUATION_DIR = "evaluation"
BEST_DIR = "best"
BEST_FILE = "best.json"
AUDIO_WEIGHTS_FILE = "multitalk.safetensors"


class PeriodicEvaluation:
    """Rank 0's evaluations of the model being trained."""

    def __init__(
        self,
        settings: EvaluationSettings,
        model_dir: str,
        encoders: ConditionEncoders,
        architecture: MultiTalkConfig,
        output: str | Path,
    ) -> None:
        self.settings = settings
        self.output = Path(output)
        self.clips = load_test_set(settings.test_set, self.output / EVALUATION_DIR / "test_set")[: settings.max_clips]
        # The training worker's encoders (and, at each call, its transformer): nothing is loaded twice. Training
        # reads wav2vec features from the shards, so the evaluation brings the audio encoder and the scheduler.
        self.encoders, self.architecture = encoders, architecture
        self.audio_encoder = Wav2VecEncoder.from_pretrained(
            Path(model_dir) / "wav2vec2", device=encoders.vae.device, dtype=torch.float32
        )
        self.scheduler = load_scheduler(Path(model_dir) / "scheduler")
        best = self.output / BEST_DIR / BEST_FILE
        self.best = json.loads(best.read_text()) if best.is_file() else None  # survives a restart

    def due(self, step: int, last: bool) -> bool:
        return step % self.settings.every == 0 or last

    def __call__(self, transformer: MultiTalkTransformer3DModel, step: int) -> dict[str, float]:
        """Generate and score the test set at `step`; returns the mean of each metric over the clips."""
        encoders = {field.name: getattr(self.encoders, field.name) for field in dataclasses.fields(ConditionEncoders)}
        components = MultiTalkComponents(
            **encoders,
            transformer=transformer,
            audio_encoder=self.audio_encoder,
            scheduler=self.scheduler,
            config=self.architecture,
        )
        pipeline = MultiTalkPipeline(components, transformer.device)
        folder = self.output / EVALUATION_DIR / f"step_{step:08d}"
        values: dict[str, list[float]] = {}
        was_training = transformer.training
        transformer.eval()
        try:
            for clip in self.clips:
                video = folder / f"{clip.clip_id}.mp4"
                generate_clip(pipeline, clip, self.settings.protocol, video)
                metrics, problem, _ = score_clip(video, clip, self.settings.syncnet_path)
                if problem:
                    logger.info("step %d, %s: no face metrics (%s)", step, clip.clip_id, problem)
                for name, value in metrics.items():
                    values.setdefault(name, []).append(value)
        finally:
            transformer.train(was_training)
        means = {name: float(np.nanmean(series)) for name, series in values.items()}
        (folder / "metrics.json").write_text(json.dumps(means, indent=2))
        self._keep_best(transformer, step, means)
        logger.info("evaluation at step %d: %s", step, means)
        return means

    def _keep_best(self, transformer: MultiTalkTransformer3DModel, step: int, means: dict[str, float]) -> None:
        metric = self.settings.keep_best
        if metric is None:
            return
        if metric not in means or not math.isfinite(means[metric]):
            logger.warning("keep_best: the evaluation at step %d has no %s (has %s)", step, metric, sorted(means))
            return
        direction = better_direction(metric) or 1
        if self.best is not None and means[metric] * direction <= self.best["value"] * direction:
            return
        folder = self.output / BEST_DIR
        folder.mkdir(parents=True, exist_ok=True)
        export_audio_weights(transformer, folder / AUDIO_WEIGHTS_FILE)
        self.best = {"step": step, "metric": metric, "value": means[metric]}
        (folder / BEST_FILE).write_text(json.dumps(self.best, indent=2))
