"""Person localisation: which person's region of the reference frame each video token attends to.

The original implementation materialises softmax(q k_ref^T / sqrt(d)) as a [heads, tokens, ref_tokens] map in
every block and multiplies it with each mask. The same numbers come out of one attention whose values are the
size-normalised masks: for class c, sum_j softmax(q k_ref^T)_j * mask_c[j] / |mask_c| is attention with
V[j, c] = mask_c[j] / |mask_c|. A fused attention kernel computes it without the map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_region_masks(region_masks: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Region masks on the latent grid [B, C, h, w] -> size-normalised token values [B, h'*w', C].

    Resized to the token grid (nearest) and binarised (> 0) as the original does; each class column sums to 1. A
    region too thin to cover a token (a background margin at low resolution) gets a zero column, so it never wins
    the argmax, where the original would divide by zero.
    """
    masks = F.interpolate(region_masks.float(), size=grid_hw, mode="nearest") > 0
    masks = masks.flatten(2).float()  # [B, C, tokens]
    sizes = masks.sum(-1, keepdim=True).clamp(min=1)
    return (masks / sizes).transpose(1, 2)


def region_scores(query: torch.Tensor, ref_key: torch.Tensor, mask_values: torch.Tensor) -> torch.Tensor:
    """Mean over heads of each token's attention mass in each region.

    query: [B, L, H, D] video queries (after q-norm and RoPE); ref_key: [B, R, H, D] keys of the first latent
    frame; mask_values: [B, R, C] from `token_region_masks`. Returns [B, L, C].
    """
    heads, head_dim = query.shape[2], query.shape[3]
    classes = mask_values.shape[-1]
    # Padded to the head size: CPU and GPU fused kernels need value and key heads of one size and otherwise fall
    # back to the math path, which materialises the very map this avoids.
    values = F.pad(mask_values.to(query.dtype), (0, head_dim - classes))[:, None].expand(-1, heads, -1, -1)
    mass = F.scaled_dot_product_attention(query.transpose(1, 2), ref_key.transpose(1, 2), values)
    return mass[..., :classes].float().mean(dim=1)
