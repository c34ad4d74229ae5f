"""The MultiTalk transformer: diffusers' WanTransformer3DModel with an audio cross-attention in every block.

Block order (as in the original): self-attention (gated) -> text/image cross-attention -> LayerNorm -> audio
cross-attention (plain residual) -> FFN (gated). The audio cross-attention is frame-local: latent frame f's video
tokens attend only to frame f's audio tokens (every person's, concatenated). With several persons, L-RoPE binds
each audio stream to the tokens that the block's self-attention localises on that person's reference region.

Audio reaches each block as an explicit argument (never a side channel), so activation checkpointing recomputes
blocks correctly. Attention runs behind processors, so a parallel runtime can swap them from outside.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanTransformerBlock

from .audio_adapter import AudioAdapter
from .config import MultiTalkConfig
from .localization import region_scores, token_region_masks
from .lrope import apply_label_rope, audio_labels, video_labels


def apply_wan_rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's 3D rotary embedding on interleaved pairs (the same arithmetic as diffusers' WanAttnProcessor)."""
    x_even, x_odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x_even * cos - x_odd * sin
    out[..., 1::2] = x_even * sin + x_odd * cos
    return out.type_as(x)


def self_attention_projections(
    attn: AttentionModuleMixin, hidden_states: torch.Tensor, rotary_emb: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Wan self-attention's queries and keys (normalised, then rotated) and values: [B, L, H, D] each."""
    if getattr(attn, "fused_projections", False):  # after `fuse_qkv_projections()`: one matmul for all three
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
    key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
    value = value.unflatten(2, (attn.heads, -1))
    if rotary_emb is not None:
        query = apply_wan_rope(query, *rotary_emb)
        key = apply_wan_rope(key, *rotary_emb)
    return query, key, value


class MultiTalkSelfAttnProcessor:
    """Wan self-attention that also measures, when given region values, where each token looks on frame 0.

    Returns (output, region scores [B, L, C] or None). The scores come from the same normalised, rotated queries
    and keys as the attention itself; they feed argmax labels only, so no gradient flows through them.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: AttentionModuleMixin,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        region_values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        query, key, value = self_attention_projections(attn, hidden_states, rotary_emb)

        scores = None
        if region_values is not None:
            with torch.no_grad():
                scores = region_scores(query, key[:, : region_values.shape[1]], region_values)

        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        out = attn.to_out[0](out.flatten(2, 3).type_as(query))
        return attn.to_out[1](out), scores


def frame_local_audio_attention(
    attn: MultiTalkAudioAttention,
    hidden_states: torch.Tensor,
    audio_tokens: torch.Tensor,
    query_labels: torch.Tensor | None = None,
    key_labels: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    backend: Any = None,
) -> torch.Tensor:
    """Video tokens [B, T*S, dim] (T whole latent frames, frame-major) attend to their own frame's audio tokens
    [B, T, N, C]; returns [B, T*S, dim] after the output projection. Label RoPE on queries and keys when given."""
    batch, num_frames, num_audio = audio_tokens.shape[:3]
    if getattr(attn, "fused_projections", False):  # after `fuse_qkv_projections()`: keys and values in one matmul
        key, value = attn.to_kv(audio_tokens).chunk(2, dim=-1)
    else:
        key, value = attn.to_k(audio_tokens), attn.to_v(audio_tokens)
    key = key.unflatten(-1, (attn.heads, -1))  # [B, T, N, H, D]
    value = value.unflatten(-1, (attn.heads, -1))
    if query_labels is None and attn.heads * num_audio < hidden_states.shape[-1]:
        states = hidden_states.unflatten(1, (num_frames, -1))
        return _attention_with_folded_projections(attn, states, key, value, key_mask).flatten(1, 2)

    query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))  # [B, T*S, H, D]
    if query_labels is not None:
        query = apply_label_rope(query, query_labels)
        key = apply_label_rope(key, key_labels[:, None])
    # Frame-local: fold the latent frames into the batch.
    query = query.unflatten(1, (num_frames, -1)).flatten(0, 1)
    key, value = key.flatten(0, 1), value.flatten(0, 1)
    mask = None
    if key_mask is not None:
        mask = key_mask[:, None].expand(-1, num_frames, -1).reshape(batch * num_frames, 1, 1, num_audio)
    out = dispatch_attention_fn(query, key, value, attn_mask=mask, backend=backend)
    out = out.reshape(batch, -1, attn.heads * attn.head_dim).type_as(hidden_states)
    return attn.to_out(out)


def _attention_with_folded_projections(
    attn: MultiTalkAudioAttention,
    hidden_states: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_mask: torch.Tensor | None,
) -> torch.Tensor:
    """The audio attention of [B, T, S, dim] tokens with the query projection folded into the keys and the output
    projection into the values: q_h . k = x . (W_q,h^T k) + b_q,h . k, and out = sum_h p_h (v_h W_o,h^T) + b_o.

    Without label RoPE (one person) nothing sits between the projections and the attention, so this is the same
    function up to rounding. It projects the H x N audio rows of a frame into the model width instead of every
    video token: H N dim multiply-adds per token for the two projections instead of 2 dim^2 (14B: 40 heads x 32
    audio tokens = 1,280 against dim 5,120).
    """
    heads, head_dim = attn.heads, attn.head_dim
    dim = heads * head_dim
    scale = head_dim**-0.5
    # The weights are read here, outside their layers' forward: cast them as those layers' hooks would (layerwise
    # casting stores them in float8).
    query_weight = attn.to_q.weight.to(key.dtype).view(heads, head_dim, dim)
    query_bias = attn.to_q.bias.to(key.dtype).view(heads, head_dim)
    out_weight = attn.to_out.weight.to(value.dtype).view(dim, heads, head_dim)
    keys = torch.einsum("btnhe,hed->bthnd", key, query_weight).flatten(2, 3) * scale  # [B, T, H*N, dim]
    key_bias = torch.einsum("btnhe,he->bthn", key, query_bias).flatten(2, 3) * scale
    values = torch.einsum("btnhe,dhe->bthnd", value, out_weight).flatten(2, 3)
    logits = (hidden_states @ keys.transpose(-1, -2) + key_bias[:, :, None]).unflatten(-1, (heads, -1))
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, None], float("-inf"))
    probs = logits.float().softmax(-1).to(values.dtype).flatten(-2)  # [B, T, S, H*N]
    return (probs @ values + attn.to_out.bias.to(values.dtype)).type_as(hidden_states)


class MultiTalkAudioAttnProcessor:
    """Frame-local audio cross-attention with optional label RoPE on queries and audio keys (values untouched)."""

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: MultiTalkAudioAttention,
        hidden_states: torch.Tensor,
        audio_tokens: torch.Tensor,
        query_labels: torch.Tensor | None = None,
        key_labels: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return frame_local_audio_attention(
            attn, hidden_states, audio_tokens, query_labels, key_labels, key_mask, self._attention_backend
        )


class MultiTalkAudioAttention(nn.Module, AttentionModuleMixin):
    """Video tokens (queries) attend to audio tokens (keys/values); no q/k norm, as in the original."""

    _default_processor_cls = MultiTalkAudioAttnProcessor
    _available_processors = [MultiTalkAudioAttnProcessor]
    # Queries come from the video, keys and values from the audio (another width): QKV fusion (diffusers'
    # `fuse_projections`) joins only the key and value projections, into `to_kv`.
    is_cross_attention = True
    use_bias = True

    def __init__(self, dim: int, audio_dim: int, heads: int, processor: Any = None) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(audio_dim, dim)
        self.to_v = nn.Linear(audio_dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.set_processor(processor or MultiTalkAudioAttnProcessor())

    def forward(
        self,
        hidden_states: torch.Tensor,
        audio_tokens: torch.Tensor,
        query_labels: torch.Tensor | None = None,
        key_labels: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.processor(self, hidden_states, audio_tokens, query_labels, key_labels, key_mask)


class MultiTalkTransformerBlock(WanTransformerBlock):
    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        qk_norm: str,
        cross_attn_norm: bool,
        eps: float,
        added_kv_proj_dim: int | None,
        audio_dim: int,
        norm_input_visual: bool,
    ) -> None:
        super().__init__(dim, ffn_dim, num_heads, qk_norm, cross_attn_norm, eps, added_kv_proj_dim)
        self.attn1.set_processor(MultiTalkSelfAttnProcessor())
        self.norm_audio = FP32LayerNorm(dim, eps, elementwise_affine=True) if norm_input_visual else nn.Identity()
        self.attn_audio = MultiTalkAudioAttention(dim, audio_dim, num_heads)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        audio_tokens: torch.Tensor,
        audio_key_labels: torch.Tensor | None = None,
        audio_key_mask: torch.Tensor | None = None,
        region_values: torch.Tensor | None = None,
        lrope_samples: torch.Tensor | None = None,
    ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
            self.scale_shift_table + temb.float()
        ).chunk(6, dim=1)

        # 1. Self-attention, which also localises the persons when L-RoPE is on.
        norm_hidden_states = (self.norm1(hidden_states.float()) * (1 + scale_msa) + shift_msa).type_as(hidden_states)
        attn_output, scores = self.attn1(norm_hidden_states, None, None, rotary_emb, region_values=region_values)
        hidden_states = (hidden_states.float() + attn_output * gate_msa).type_as(hidden_states)

        # 2. Text + image cross-attention.
        norm_hidden_states = self.norm2(hidden_states.float()).type_as(hidden_states)
        hidden_states = hidden_states + self.attn2(norm_hidden_states, encoder_hidden_states, None, None)

        # 3. Audio cross-attention. Samples with one stream get label 0 everywhere: the identity rotation.
        query_labels = None
        if scores is not None:
            query_labels = video_labels(scores) * lrope_samples[:, None]
        norm_hidden_states = self.norm_audio(hidden_states.float()).type_as(hidden_states)
        hidden_states = hidden_states + self.attn_audio(
            norm_hidden_states, audio_tokens, query_labels, audio_key_labels, audio_key_mask
        )

        # 4. Feed-forward.
        norm_hidden_states = (self.norm3(hidden_states.float()) * (1 + c_scale_msa) + c_shift_msa).type_as(
            hidden_states
        )
        ff_output = self.ffn(norm_hidden_states)
        return (hidden_states.float() + ff_output.float() * c_gate_msa).type_as(hidden_states)


class BlockAudioArgs(NamedTuple):
    """The audio arguments every block takes after (hidden_states, encoder_hidden_states, temb, rotary_emb), in
    `MultiTalkTransformerBlock.forward`'s order: `run_blocks` passes them positionally, as hooks then see them."""

    audio_tokens: torch.Tensor  # [B, T, P * tokens, audio_dim] every person's audio tokens per latent frame
    audio_key_labels: torch.Tensor | None  # [B, P * tokens] L-RoPE labels of the audio keys; None: no sample has two
    audio_key_mask: torch.Tensor | None  # [B, P * tokens] the audio keys of the streams a sample uses; None: all
    region_values: torch.Tensor | None  # the persons' regions on the token grid, for localisation; None: none
    lrope_samples: torch.Tensor  # [B] bool: the samples with several streams (localised, L-RoPE on)


@dataclass
class BlockStackInputs:
    """What the block stack reads, built once per forward by `embed`.

    `forward` is `finalize(run_blocks(embed(...)))`; the split is the seam a step cache uses to skip the blocks
    and reuse their cached residual (`guidance.StepCache`).
    """

    hidden_states: torch.Tensor  # [B, L, dim] patch embeddings: the stack's input
    encoder_hidden_states: torch.Tensor  # [B, 257 + text_len, dim] image then text tokens
    timestep_proj: torch.Tensor  # [B, 6, dim] the blocks' modulation, a function of the timestep only
    rotary_emb: tuple[torch.Tensor, torch.Tensor]
    block_args: BlockAudioArgs
    temb: torch.Tensor  # [B, dim] the output head's modulation
    grid: tuple[int, int, int]  # latent frames, token rows, token columns


def _signature_from_config(init: Any) -> Any:
    """Gives `init` MultiTalkConfig's fields, with their defaults, as keyword arguments.

    diffusers reads a model's constructor signature to save and load config.json (`register_to_config`,
    `from_config`): generating it from the dataclass keeps MultiTalkConfig the one description of the architecture.
    """
    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    parameters += [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
        for f in dataclasses.fields(MultiTalkConfig)
    ]
    init.__signature__ = inspect.Signature(parameters)
    return init


class MultiTalkTransformer3DModel(WanTransformer3DModel):
    r"""Wan2.1-I2V transformer with the MultiTalk audio branch.

    Takes the fields of `MultiTalkConfig` as keyword arguments (its `config` holds exactly them); build it from a
    typed config with `from_multitalk_config`.
    """

    _no_split_modules = ["MultiTalkTransformerBlock"]
    _repeated_blocks = ["MultiTalkTransformerBlock"]
    _keep_in_fp32_modules = WanTransformer3DModel._keep_in_fp32_modules + ["norm_audio"]
    # diffusers' inherited context-parallel plan splits the sequence at the block boundaries it knows; it knows
    # nothing of the frame-local audio attention (whose frames must stay whole) nor of the localisation (which
    # reads frame 0's keys), so `enable_parallelism()` would silently split them wrong. serving/parallel.py holds
    # the sequence parallelism this model supports.
    _cp_plan = None

    @register_to_config
    @_signature_from_config
    def __init__(self, **config: Any) -> None:
        architecture = MultiTalkConfig(**config)
        wan = architecture.wan_kwargs()
        # The undecorated parent constructor: it builds the embeddings and output head without registering its
        # own config over ours, and no Wan blocks (ours replace them).
        WanTransformer3DModel.__init__.__wrapped__(self, **{**wan, "num_layers": 0})
        self.blocks = nn.ModuleList(
            [
                MultiTalkTransformerBlock(
                    architecture.dim,
                    architecture.ffn_dim,
                    architecture.num_attention_heads,
                    wan["qk_norm"],
                    architecture.cross_attn_norm,
                    architecture.eps,
                    wan["added_kv_proj_dim"],
                    architecture.audio_dim,
                    architecture.norm_input_visual,
                )
                for _ in range(architecture.num_layers)
            ]
        )
        self.audio_adapter = AudioAdapter(
            window=architecture.audio_window,
            layers=architecture.audio_layers,
            channels=architecture.audio_channels,
            intermediate_dim=architecture.audio_intermediate_dim,
            audio_dim=architecture.audio_dim,
            tokens=architecture.audio_tokens,
            vae_scale=architecture.vae_scale,
            norm_output=architecture.norm_output_audio,
        )

    @classmethod
    def from_multitalk_config(cls, config: MultiTalkConfig) -> MultiTalkTransformer3DModel:
        """Builds the model (random weights) on the current default device; use torch.device('meta') to skip memory."""
        return cls(**config.to_dict())

    @property
    def architecture(self) -> MultiTalkConfig:
        """The typed config this model was built from."""
        return MultiTalkConfig.from_dict({key: value for key, value in self.config.items() if not key.startswith("_")})

    def audio_parameter_names(self) -> list[str]:
        """The parameters MultiTalk trains: the audio adapter and every block's audio norm + cross-attention."""
        return [
            name
            for name, _ in self.named_parameters()
            if name.startswith("audio_adapter.") or ".norm_audio." in name or ".attn_audio." in name
        ]

    def encode_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, P, F, window, layers, channels] -> audio tokens [B, T, P * tokens, audio_dim], persons in order."""
        batch, persons = audio.shape[:2]
        tokens = self.audio_adapter(audio.flatten(0, 1).to(self.dtype))  # [B*P, T, n, C]
        return tokens.unflatten(0, (batch, persons)).transpose(1, 2).flatten(2, 3)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor,
        audio: torch.Tensor,
        region_masks: torch.Tensor | None = None,
        audio_streams: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        r"""Predicts the flow velocity.

        Args:
            hidden_states: `[B, in_channels, T, H, W]`, the noisy latent concatenated with the condition (mask + VAE
                latent of the condition frames).
            timestep: `[B]` diffusion timesteps in [0, 1000].
            encoder_hidden_states: `[B, L <= text_len, text_dim]` text-encoder states; zero-padded to text_len here.
            encoder_hidden_states_image: `[B, 257, image_dim]` CLIP hidden states of the condition image.
            audio: `[B, P, F, window, layers, channels]` per person, for each of the F = vae_scale * (T - 1) + 1 video
                frames, the window of stacked wav2vec2 layer outputs.
            region_masks: `[B, P + 1, H, W]` person regions then background on the latent grid. Needed when a sample
                has several streams.
            audio_streams: `[B]` how many of the P streams each sample uses (default all). A sample with one stream
                takes the single-person path (no localisation, no L-RoPE); its unused streams are masked out. This
                lets the guidance passes with different stream counts share one forward.
        """
        if attention_kwargs:
            raise ValueError(f"attention_kwargs are not supported: {sorted(attention_kwargs)}")
        inputs = self.embed(
            hidden_states,
            timestep,
            encoder_hidden_states,
            encoder_hidden_states_image,
            audio,
            region_masks,
            audio_streams,
        )
        output = self.finalize(self.run_blocks(inputs), inputs)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)

    def embed(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor,
        audio: torch.Tensor,
        region_masks: torch.Tensor | None = None,
        audio_streams: torch.Tensor | None = None,
    ) -> BlockStackInputs:
        """The first part of `forward` (same arguments): everything the block stack reads."""
        batch_size, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        grid = (num_frames // p_t, height // p_h, width // p_w)
        num_persons = audio.shape[1]
        expected_frames = self.config.vae_scale * (num_frames - 1) + 1
        if audio.shape[2] != expected_frames:
            raise ValueError(
                f"audio covers {audio.shape[2]} video frames; {num_frames} latent frames need {expected_frames}"
            )

        rotary_emb = self.rope(hidden_states)
        hidden_states = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()

        text_len = self.config.text_len
        if encoder_hidden_states.shape[1] > text_len:
            raise ValueError(f"text context has {encoder_hidden_states.shape[1]} tokens; at most {text_len} fit")
        encoder_hidden_states = F.pad(encoder_hidden_states, (0, 0, 0, text_len - encoder_hidden_states.shape[1]))
        temb, timestep_proj, encoder_hidden_states, image_states = self.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image
        )
        timestep_proj = timestep_proj.unflatten(1, (6, -1))
        encoder_hidden_states = torch.cat([image_states, encoder_hidden_states], dim=1)

        audio_tokens = self.encode_audio(audio)
        streams = self._stream_counts(audio_streams, batch_size, num_persons, audio.device)
        tokens_per_person = self.config.audio_tokens
        # Every branch below depends on shapes and on which arguments are given, never on tensor values, so the
        # forward traces into one graph (torch.compile fullgraph=True, torch.export). A sample with fewer streams
        # is handled by its row of the key mask, a one-stream sample by L-RoPE label 0 (the identity).
        audio_key_mask = None
        if audio_streams is not None and num_persons > 1:
            stream_of_token = torch.arange(num_persons, device=audio.device).repeat_interleave(tokens_per_person)
            audio_key_mask = stream_of_token[None] < streams[:, None]
        lrope_samples = streams > 1
        audio_key_labels = region_values = None
        if num_persons > 1 and region_masks is not None:  # one person: no L-RoPE and no localisation at all
            if region_masks.shape[1] != num_persons + 1:
                raise ValueError(f"{num_persons} audio streams need region_masks [B, {num_persons + 1}, H, W]")
            audio_key_labels = audio_labels(num_persons, tokens_per_person, audio.device)[None] * lrope_samples[:, None]
            region_values = token_region_masks(region_masks, grid[1:])
        elif num_persons > 1 and not torch.compiler.is_compiling() and lrope_samples.any():
            raise ValueError(f"{num_persons} audio streams need region_masks [B, {num_persons + 1}, H, W]")

        return BlockStackInputs(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            timestep_proj=timestep_proj,
            rotary_emb=rotary_emb,
            block_args=BlockAudioArgs(audio_tokens, audio_key_labels, audio_key_mask, region_values, lrope_samples),
            temb=temb,
            grid=grid,
        )

    def run_blocks(self, inputs: BlockStackInputs) -> torch.Tensor:
        """The transformer blocks on `inputs.hidden_states`; returns the stack's output [B, L, dim]."""
        hidden_states = inputs.hidden_states
        fixed_args = (inputs.encoder_hidden_states, inputs.timestep_proj, inputs.rotary_emb, *inputs.block_args)
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(block, hidden_states, *fixed_args)
            else:
                hidden_states = block(hidden_states, *fixed_args)
        return hidden_states

    def finalize(self, hidden_states: torch.Tensor, inputs: BlockStackInputs) -> torch.Tensor:
        """The output head on the block stack's output: the velocity `[B, out_channels, T, H, W]`."""
        p_t, p_h, p_w = self.config.patch_size
        shift, scale = (self.scale_shift_table.to(inputs.temb.device) + inputs.temb.unsqueeze(1)).chunk(2, dim=1)
        hidden_states = (self.norm_out(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
        hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(hidden_states.shape[0], *inputs.grid, p_t, p_h, p_w, -1)
        return hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)

    @staticmethod
    def _stream_counts(
        audio_streams: torch.Tensor | None, batch_size: int, num_persons: int, device: torch.device
    ) -> torch.Tensor:
        if audio_streams is None:
            return torch.full((batch_size,), num_persons, device=device)
        streams = torch.as_tensor(audio_streams, device=device)
        if streams.shape != (batch_size,):
            raise ValueError(f"audio_streams must hold {batch_size} counts, got shape {list(streams.shape)}")
        # The range check reads the values: eager only (a compiled or exported graph takes them as given).
        if not torch.compiler.is_compiling() and ((streams < 1).any() or (streams > num_persons).any()):
            raise ValueError(
                f"audio_streams must hold {batch_size} counts in [1, {num_persons}], got {streams.tolist()}"
            )
        return streams
