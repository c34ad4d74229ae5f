"""Sequence- and guidance-parallel generation over torch.distributed, applied to the transformer from outside.

Both modes split the work of the block stack over the K ranks of a process group and leave the rest alone: every
rank runs the same pipeline in lockstep (same seed, same embed / finalize / guidance / Euler step), forward
pre-hooks on the blocks hand each rank its share of the block inputs, and a forward hook on the last block
all-gathers the stack's output, so every rank holds the whole velocity and takes the same step. The model code
knows nothing of this: the hooks sit on `MultiTalkTransformer3DModel.blocks`, and sequence parallel swaps the
blocks' attention processors.

Sequence parallel: rank r holds the r-th contiguous chunk of the video tokens (the last chunk zero-padded to a
common length). Self-attention is Ulysses: one all-to-all turns "my tokens, all heads" into "all tokens, my
heads" (heads must divide by K), attention runs over the whole sequence, a second all-to-all turns it back.
Ulysses over an all-gather of K/V because it moves 4 L dim / K numbers per rank and block instead of 2 L dim, and
because it leaves every rank with all of frame 0's keys for its heads, so the person localisation only gathers
those few keys across heads (as the reference all-gathers its reference keys). The L-RoPE min-max runs over all
tokens of a sample through an all-reduced minimum and maximum. The audio cross-attention is frame-local: each
rank attends with its tokens to the audio tokens of their own latent frames (a token's frame is its global index
// tokens per frame), so a frame split between two ranks attends the same as whole. Text / image
cross-attention, norms and FFN are token-local and run on the chunk as they are.

Guidance parallel: the passes of a step are the batch of one transformer forward (`guidance.GuidedDenoiser`), so
rank r runs the blocks for the r-th share of that batch (pass r when K equals the number of passes) and the
predictions are all-gathered before `combine`, which every rank then computes identically.

Inference only: the collectives are not differentiable.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch.utils.hooks import RemovableHandle

from multitalk_model.localization import region_scores
from multitalk_model.transformer import (
    BlockAudioArgs,
    MultiTalkAudioAttention,
    MultiTalkTransformer3DModel,
    frame_local_audio_attention,
    self_attention_projections,
)

# MultiTalkTransformerBlock.forward, as `run_blocks` calls it, everything positional: hidden_states,
# encoder_hidden_states, temb, rotary_emb, then the fields of BlockAudioArgs.
_BLOCK_ARG_COUNT = 4 + len(BlockAudioArgs._fields)


class _BlockStackSplit(Protocol):
    def shard_block_args(self, args: tuple[Any, ...], first: bool) -> tuple[Any, ...]:
        """A block's positional arguments -> this rank's share (the hidden states are split at the first block)."""

    def gather(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The last block's output on this rank -> the whole stack's output, on every rank."""


class _SequenceSplit:
    """This rank's contiguous chunk of the video tokens; measured anew by the first block of every forward."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.total = 0  # video tokens of the sample
        self.per_frame = 1  # tokens of one latent frame
        self.rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def chunk(self) -> int:
        return -(-self.total // self.world)

    @property
    def start(self) -> int:
        return self.rank * self.chunk

    @property
    def valid(self) -> int:
        """Tokens of this rank's chunk that are real (the rest is padding on the last rank)."""
        return min(self.chunk, self.total - self.start)

    def shard_block_args(self, args: tuple[Any, ...], first: bool) -> tuple[Any, ...]:
        hidden_states, encoder_hidden_states, temb, rotary_emb, *audio = args
        audio = BlockAudioArgs(*audio)
        if first:
            self.total = hidden_states.shape[1]
            self.per_frame = self.total // audio.audio_tokens.shape[1]
            if (self.world - 1) * self.chunk >= self.total:
                raise ValueError(f"sequence parallel over {self.world} ranks needs more than {self.total} video tokens")
            hidden_states = self._local(hidden_states)
            self.rotary_emb = (self._local(rotary_emb[0]), self._local(rotary_emb[1]))
        return (hidden_states, encoder_hidden_states, temb, self.rotary_emb, *audio)

    def gather(self, hidden_states: torch.Tensor) -> torch.Tensor:
        chunks = [torch.empty_like(hidden_states) for _ in range(self.world)]
        dist.all_gather(chunks, hidden_states.contiguous(), group=self.group)
        return torch.cat(chunks, dim=1)[:, : self.total]

    def span_all_tokens(self, scores: torch.Tensor) -> torch.Tensor:
        """Localisation scores [B, chunk, C] -> [B, chunk + 2, C]: the real tokens' rows, the padding's rows set to
        the minimum, then the all-reduced minimum and maximum of every class over all tokens of the sample.

        The block min-max scales the scores it gets (`lrope.video_labels`); with the two extreme rows appended its
        minimum and maximum are those of the whole sequence. The audio processor drops the two extra labels.
        """
        scores = scores[:, : self.valid]
        low = scores.amin(dim=1, keepdim=True)
        high = scores.amax(dim=1, keepdim=True)
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=self.group)
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=self.group)
        padding = low.expand(-1, self.chunk - self.valid, -1)
        return torch.cat([scores, padding, low, high], dim=1)

    def _local(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] -> this rank's chunk [B, chunk, ...], zero-padded at the end of the sequence."""
        local = tokens[:, self.start : self.start + self.chunk]
        missing = self.chunk - local.shape[1]
        if missing:
            local = torch.cat([local, local.new_zeros(local.shape[0], missing, *local.shape[2:])], dim=1)
        return local


class _BatchSplit:
    """This rank's share of the batch: the guidance passes of the batched forward."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.batch = 0

    def shard_block_args(self, args: tuple[Any, ...], first: bool) -> tuple[Any, ...]:
        if first:
            self.batch = args[0].shape[0]
            if self.batch % self.world:
                raise ValueError(
                    f"guidance parallel over {self.world} ranks needs a multiple of {self.world} guidance passes "
                    f"per forward, got {self.batch}"
                )
        share = self.batch // self.world
        rows = slice(self.rank * share, (self.rank + 1) * share)
        hidden_states, *fixed = args
        if first:
            hidden_states = hidden_states[rows]
        # Per-sample arguments have the batch first; the rotary embedding (a tuple) is shared by all samples.
        fixed = [arg[rows] if isinstance(arg, torch.Tensor) and arg.shape[0] == self.batch else arg for arg in fixed]
        return (hidden_states, *fixed)

    def gather(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shares = [torch.empty_like(hidden_states) for _ in range(self.world)]
        dist.all_gather(shares, hidden_states.contiguous(), group=self.group)
        return torch.cat(shares, dim=0)


def _all_tokens_my_heads(x: torch.Tensor, group: dist.ProcessGroup | None, world: int) -> torch.Tensor:
    """Ulysses all-to-all: [B, chunk, H, D] on every rank -> [B, world * chunk, H / world, D], heads of this rank."""
    batch, chunk, heads, head_dim = x.shape
    send = x.reshape(batch, chunk, world, heads // world, head_dim).permute(2, 0, 1, 3, 4).contiguous()
    received = torch.empty_like(send)  # [source rank, B, chunk, H / world, D]
    dist.all_to_all_single(received, send, group=group)
    return received.transpose(0, 1).reshape(batch, world * chunk, heads // world, head_dim)


def _my_tokens_all_heads(x: torch.Tensor, group: dist.ProcessGroup | None, world: int) -> torch.Tensor:
    """The inverse all-to-all: [B, world * chunk, H / world, D] -> [B, chunk, H, D]."""
    batch, total, rank_heads, head_dim = x.shape
    send = x.reshape(batch, world, total // world, rank_heads, head_dim).transpose(0, 1).contiguous()
    received = torch.empty_like(send)  # [source rank = head group, B, chunk, H / world, D]
    dist.all_to_all_single(received, send, group=group)
    return received.permute(1, 2, 0, 3, 4).reshape(batch, total // world, world * rank_heads, head_dim)


class _UlyssesSelfAttnProcessor:
    """`MultiTalkSelfAttnProcessor` on a chunk of the tokens: the same output and localisation scores for it."""

    _parallel_config = None

    def __init__(self, split: _SequenceSplit, attention_backend: Any = None) -> None:
        self.split = split
        self._attention_backend = attention_backend

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        region_values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("sequence-parallel self-attention takes neither a context nor a mask")
        split = self.split
        query, key, value = self_attention_projections(attn, hidden_states, rotary_emb)

        # One all-to-all for all three (stacked along the batch) instead of three.
        stacked = _all_tokens_my_heads(torch.cat([query, key, value]), split.group, split.world)
        all_query, all_key, all_value = stacked.chunk(3)
        # The padding sits at the end of the sequence: cut it from the keys, so no real token attends to it.
        out = dispatch_attention_fn(
            all_query, all_key[:, : split.total], all_value[:, : split.total], backend=self._attention_backend
        )
        out = _my_tokens_all_heads(out, split.group, split.world)

        scores = None
        if region_values is not None:
            with torch.no_grad():
                frame0_keys = all_key[:, : region_values.shape[1]].contiguous()  # [B, R, H / K, D]
                head_groups = [torch.empty_like(frame0_keys) for _ in range(split.world)]
                dist.all_gather(head_groups, frame0_keys, group=split.group)
                scores = region_scores(query, torch.cat(head_groups, dim=2), region_values)
                scores = split.span_all_tokens(scores)

        out = attn.to_out[0](out.flatten(2, 3).type_as(query))
        return attn.to_out[1](out), scores


class _FrameLocalAudioAttnProcessor:
    """`MultiTalkAudioAttnProcessor` on a chunk of the tokens: each token attends to its own frame's audio."""

    _parallel_config = None

    def __init__(self, split: _SequenceSplit, attention_backend: Any = None) -> None:
        self.split = split
        self._attention_backend = attention_backend

    def __call__(
        self,
        attn: MultiTalkAudioAttention,
        hidden_states: torch.Tensor,
        audio_tokens: torch.Tensor,
        query_labels: torch.Tensor | None = None,
        key_labels: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        split = self.split
        start, valid, per_frame = split.start, split.valid, split.per_frame
        first_frame, last_frame = start // per_frame, (start + valid - 1) // per_frame
        # The chunk's real tokens, padded out to whole frames: then they fold into frames as in the unsharded
        # processor. Past `valid` are padding and (in the labels) the extreme rows; the pad rows' outputs are cut.
        lead = start - first_frame * per_frame
        trail = (last_frame - first_frame + 1) * per_frame - lead - valid
        states = F.pad(hidden_states[:, :valid], (0, 0, lead, trail))
        labels = None if query_labels is None else F.pad(query_labels[:, :valid], (lead, trail))
        audio_tokens = audio_tokens[:, first_frame : last_frame + 1]
        out = frame_local_audio_attention(
            attn, states, audio_tokens, labels, key_labels, key_mask, self._attention_backend
        )[:, lead : lead + valid]
        return F.pad(out, (0, 0, 0, hidden_states.shape[1] - valid))


@dataclass
class _Applied:
    mode: str
    handles: list[RemovableHandle] = field(default_factory=list)
    processors: list[tuple[Any, Any]] = field(default_factory=list)  # per block: (self-attention, audio) originals


_APPLIED: weakref.WeakKeyDictionary[MultiTalkTransformer3DModel, _Applied] = weakref.WeakKeyDictionary()


def _shard_hook(split: _BlockStackSplit, first: bool, module: torch.nn.Module, args: tuple[Any, ...]) -> tuple:
    if len(args) != _BLOCK_ARG_COUNT:
        raise TypeError(f"parallel blocks take their {_BLOCK_ARG_COUNT} arguments positionally, got {len(args)}")
    return split.shard_block_args(args, first)


def _attach(transformer: MultiTalkTransformer3DModel, split: _BlockStackSplit, applied: _Applied) -> None:
    if transformer in _APPLIED:
        raise ValueError(f"{_APPLIED[transformer].mode} parallel is already applied to this transformer")
    blocks = transformer.blocks
    if not len(blocks):
        raise ValueError("the transformer has no blocks to parallelise")
    for index, block in enumerate(blocks):
        applied.handles.append(block.register_forward_pre_hook(partial(_shard_hook, split, index == 0)))
    applied.handles.append(blocks[-1].register_forward_hook(lambda module, args, output: split.gather(output)))
    _APPLIED[transformer] = applied


def apply_sequence_parallel(transformer: MultiTalkTransformer3DModel, group: dist.ProcessGroup | None = None) -> None:
    """Splits the video tokens of every forward over the ranks of `group` (default: the whole world)."""
    world = dist.get_world_size(group)
    heads = transformer.config.num_attention_heads
    if heads % world:
        raise ValueError(f"sequence parallel over {world} ranks needs the head count ({heads}) divisible by {world}")
    split = _SequenceSplit(group)
    applied = _Applied("sequence")
    _attach(transformer, split, applied)
    for block in transformer.blocks:
        self_attn, audio_attn = block.attn1.processor, block.attn_audio.processor
        applied.processors.append((self_attn, audio_attn))
        block.attn1.set_processor(_UlyssesSelfAttnProcessor(split, self_attn._attention_backend))
        block.attn_audio.set_processor(_FrameLocalAudioAttnProcessor(split, audio_attn._attention_backend))


def apply_guidance_parallel(transformer: MultiTalkTransformer3DModel, group: dist.ProcessGroup | None = None) -> None:
    """Splits the guidance passes (the batch) of every forward over the ranks of `group` (default: the world)."""
    _attach(transformer, _BatchSplit(group), _Applied("guidance"))


def remove_sequence_parallel(transformer: MultiTalkTransformer3DModel) -> None:
    """Restores the single-process transformer after `apply_sequence_parallel`."""
    _remove(transformer, "sequence")


def remove_guidance_parallel(transformer: MultiTalkTransformer3DModel) -> None:
    """Restores the single-process transformer after `apply_guidance_parallel`."""
    _remove(transformer, "guidance")


def _remove(transformer: MultiTalkTransformer3DModel, mode: str) -> None:
    applied = _APPLIED.get(transformer)
    if applied is None or applied.mode != mode:
        raise ValueError(f"{mode} parallel is not applied to this transformer")
    for handle in applied.handles:
        handle.remove()
    for block, (self_attn, audio_attn) in zip(transformer.blocks, applied.processors, strict=False):
        block.attn1.set_processor(self_attn)
        block.attn_audio.set_processor(audio_attn)
    del _APPLIED[transformer]


__all__ = [
    "apply_guidance_parallel",
    "apply_sequence_parallel",
    "remove_guidance_parallel",
    "remove_sequence_parallel",
]
