"""The decoder's two-way transformer for many prompts on one image, without a copy of the image
tokens per prompt.

When B prompts share one image embedding (point or box prompts, no mask prompt), prompt b's
image tokens start as the same (N, C) rows. An image->token attention adds to each row a
weighted sum of that prompt's few token values (per head, a softmax over its tokens; the output
projection of each head's values is per prompt too), and a LayerNorm rescales each row. So after any number of layers prompt b's row n is

    X[b, n] = scale[b, n] * shared[n] + coeffs[b, :, n] @ basis[b] + offset

with ``shared`` (N, C) common to all prompts, ``scale`` (B, N), ``coeffs`` (B, R, N), ``basis``
(B, R, C), ``offset`` (C,) or (N, C), and R growing by heads x tokens per image->token attention
(56 for SAM's 8 heads and 7 tokens). Linear layers act on ``shared``, ``basis`` and ``offset``
alone; an attention reads the rows through ``shared`` (once for all prompts) and ``coeffs``; a LayerNorm's
statistics come from the Gram terms of the factors. The (B, N, C) tensors of the dense path,
~1 GB each for 256 prompts at 64x64 tokens in fp32, are never formed: the mask head
(``MaskDecoder.masks_from_rows``) applies its first, per-pixel linear, layer to the factors and
makes that layer's output only for prompts whose masks are wanted, by ``FactoredRows.dense``.

The same numbers as ``TwoWayTransformer`` in exact arithmetic; in floating point they differ
by rounding (the sums are grouped differently). The LayerNorm statistics are computed in fp32
whatever the autocast, because they subtract terms that may nearly cancel. Used by the automatic
mask generator's fast mode; ``tests/test_factored_decoder.py`` checks it against the dense path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .transformer import Attention, TwoWayTransformer


@dataclass
class FactoredRows:
    """B prompts' (N, C) rows as ``scale * shared + coeffs^T @ basis + offset`` (see the module's
    docstring). ``scale`` None means 1."""

    scale: Optional[Tensor]  # (B, N)
    shared: Tensor  # (N, C)
    coeffs: Tensor  # (B, R, N)
    basis: Tensor  # (B, R, C)
    offset: Tensor  # (C,) or (N, C)

    @classmethod
    def of_shared(cls, rows: Tensor, batch: int) -> "FactoredRows":
        """(N, C) rows that every one of ``batch`` prompts has."""
        n, c = rows.shape
        return cls(None, rows, rows.new_zeros(batch, 0, n), rows.new_zeros(batch, 0, c), rows.new_zeros(c))

    def select(self, prompts: Tensor) -> "FactoredRows":
        """The rows of ``prompts`` (K,) only."""
        scale = None if self.scale is None else self.scale[prompts]
        return FactoredRows(scale, self.shared, self.coeffs[prompts], self.basis[prompts], self.offset)

    def matmul(self, weight: Tensor, bias: Tensor) -> "FactoredRows":
        """Every row times ``weight`` (C, C') plus ``bias`` (C',)."""
        return FactoredRows(self.scale, self.shared @ weight, self.coeffs, self.basis @ weight,
                            self.offset @ weight + bias)

    def linear(self, layer: nn.Linear) -> "FactoredRows":
        return self.matmul(layer.weight.t(), layer.bias)

    def plus(self, rows: Tensor) -> "FactoredRows":
        """Add (N, C) rows shared by every prompt (a positional encoding)."""
        return FactoredRows(self.scale, self.shared, self.coeffs, self.basis, self.offset + rows)

    def plus_low_rank(self, coeffs: Tensor, basis: Tensor, bias: Tensor) -> "FactoredRows":
        """Add ``coeffs^T @ basis + bias``: coeffs (B, R', N), basis (B, R', C), bias (C,)."""
        return FactoredRows(self.scale, self.shared, torch.cat([self.coeffs, coeffs.to(self.coeffs.dtype)], dim=1),
                            torch.cat([self.basis, basis.to(self.basis.dtype)], dim=1), self.offset + bias)

    def layer_norm(self, norm: nn.LayerNorm) -> "FactoredRows":
        """``norm`` applied to every prompt's rows, still factored."""
        scale, shared, coeffs, basis, offset = self.scale, self.shared, self.coeffs, self.basis, self.offset
        if scale is None:  # every term but the low-rank one is shared: fold the offset in
            shared, offset = shared + offset, None
        elif offset.dim() != 1:
            raise ValueError("a per-row offset under a per-prompt scale cannot stay factored")
        with torch.autocast(shared.device.type, enabled=False):
            shared, coeffs, basis = shared.float(), coeffs.float(), basis.float()
            if offset is not None:  # a constant row: one more basis row, with weight 1 in every row
                b, _, n = coeffs.shape
                coeffs = torch.cat([coeffs, coeffs.new_ones(b, 1, n)], dim=1)
                basis = torch.cat([basis, offset.float().expand(b, 1, -1)], dim=1)
            shared = shared - shared.mean(-1, keepdim=True)  # each term centred over C
            basis = basis - basis.mean(-1, keepdim=True)
            # |a S + K^T B|^2 of each (centred) row = a^2 S.S + 2 a K.(B S) + K^T (B B^T) K
            own = shared.pow(2).sum(-1)  # (N,)
            cross = (torch.matmul(basis, shared.t()) * coeffs).sum(1)  # (B, N)
            quad = (torch.bmm(basis @ basis.transpose(1, 2), coeffs) * coeffs).sum(1)
            if scale is None:
                squares = own + 2 * cross + quad
            else:
                scale = scale.float()
                squares = scale * scale * own + 2 * scale * cross + quad
            rstd = torch.rsqrt((squares / shared.shape[-1]).clamp_min(0) + norm.eps)  # (B, N)
            new_scale = rstd if scale is None else scale * rstd
            return FactoredRows(new_scale, shared * norm.weight.float(), coeffs * rstd[:, None, :],
                                basis * norm.weight.float(), norm.bias.float())

    def dense(self, prompts: Optional[Tensor] = None, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The rows of every prompt, or of ``prompts`` (K,) only: (B or K, N, C), computed in
        ``dtype`` (default ``shared``'s) whatever the autocast: the shared term and the offset
        in one pass, then one batched product added to it."""
        rows = self if prompts is None else self.select(prompts)
        dtype = dtype or self.shared.dtype
        with torch.autocast(self.shared.device.type, enabled=False):
            shared, offset = rows.shared.to(dtype), rows.offset.to(dtype)
            if rows.scale is None:
                start = shared + offset  # (N, C), broadcast over the prompts
            else:
                start = torch.addcmul(offset, rows.scale[..., None].to(dtype), shared)  # (B, N, C)
            return torch.baddbmm(start, rows.coeffs.transpose(1, 2).to(dtype), rows.basis.to(dtype))


def _heads(x: Tensor, heads: int) -> Tensor:
    """(..., C') -> (..., heads, C'/heads)."""
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


def _logits(queries: Tensor, rows: FactoredRows) -> Tensor:
    """Dot products of per-prompt token queries (h, B, T, d) with factored rows (width h*d):
    (h, B, T, N). Heads first, so that the shared term is one batched product per head and the
    other terms accumulate into the same buffer."""
    h, b, t, d = queries.shape
    flat = queries.reshape(h, b * t, d)
    logits = torch.bmm(flat, _heads(rows.shared, h).permute(1, 2, 0)).view(h, b, t, -1)
    if rows.scale is not None:
        logits.mul_(rows.scale[None, :, None, :])
    offset = _heads(rows.offset, h)
    if offset.dim() == 3:  # (N, h, d)
        logits.view(h, b * t, -1).baddbmm_(flat.to(logits.dtype), offset.permute(1, 2, 0).to(logits.dtype))
    else:  # (h, d): the same for every row
        logits.add_(torch.einsum("hbtd,hd->hbt", queries, offset)[..., None])
    through_basis = torch.einsum("hbtd,brhd->hbtr", queries, _heads(rows.basis, h)).to(logits.dtype)
    coeffs = rows.coeffs.to(logits.dtype)  # (B, R, N)
    for head in range(h):
        logits[head].baddbmm_(through_basis[head], coeffs)
    return logits


def token_to_image(attn: Attention, queries: Tensor, keys: FactoredRows, values: FactoredRows) -> Tensor:
    """``attn(q=queries, k=keys, v=values)`` with factored image rows: queries (B, T, C) -> (B, T, C)."""
    h = attn.num_heads
    q = _heads(attn.q_proj(queries), h).permute(2, 0, 1, 3)  # (h, B, T, d)
    k, v = keys.linear(attn.k_proj), values.linear(attn.v_proj)
    p = torch.softmax(_logits(q / math.sqrt(q.shape[-1]), k), dim=-1)  # (h, B, T, N)
    _, b, t, n = p.shape
    weighted = p if v.scale is None else p * v.scale[None, :, None, :]
    out = torch.bmm(weighted.view(h, b * t, n), _heads(v.shared, h).transpose(0, 1))  # (h, B*T, d)
    offset = _heads(v.offset, h)
    if offset.dim() == 3:
        out = out + torch.bmm(p.view(h, b * t, n), offset.transpose(0, 1))
    else:  # the weights sum to 1
        out = out + offset[:, None, :]
    out = out.view(h, b, t, -1)
    basis = _heads(v.basis, h)  # (B, R, h, d)
    coeffs = v.coeffs.transpose(1, 2).to(p.dtype)  # (B, N, R)
    for head in range(h):
        out[head] += torch.bmm(torch.bmm(p[head], coeffs), basis[:, :, head]).to(out.dtype)
    return attn.out_proj(out.permute(1, 2, 0, 3).reshape(b, t, attn.internal_dim))


def image_to_token(attn: Attention, queries: FactoredRows, keys: Tensor, values: Tensor
                   ) -> Tuple[Tensor, Tensor, Tensor]:
    """``attn(q=queries, k=keys, v=values)`` with factored image rows as queries and the prompts'
    tokens (B, T, C) as keys and values, as a low-rank term: coeffs (B, h*T, N), basis
    (B, h*T, C) and the bias (C,), whose sum ``coeffs^T @ basis + bias`` is the attention's output."""
    h = attn.num_heads
    k = _heads(attn.k_proj(keys), h).permute(2, 0, 1, 3)  # (h, B, T, d)
    v = _heads(attn.v_proj(values), h)  # (B, T, h, d)
    p = torch.softmax(_logits(k / math.sqrt(k.shape[-1]), queries.linear(attn.q_proj)), dim=-2)  # (h, B, T, N)
    # out_proj(concat over heads of p_h @ v_h) = sum over heads and tokens of p * (v_h @ W_h^T)
    through_out = torch.einsum("bthd,chd->bhtc", v, _heads(attn.out_proj.weight, h))  # (B, h, T, C)
    _, b, t, n = p.shape
    return p.transpose(0, 1).reshape(b, h * t, n), through_out.reshape(b, h * t, -1), attn.out_proj.bias


def run_factored(transformer: TwoWayTransformer, image_embedding: Tensor, image_pe: Tensor,
                 point_embedding: Tensor) -> Tuple[Tensor, FactoredRows]:
    """``transformer(image_embedding, image_pe, point_embedding)`` for prompts sharing one image:
    image_embedding, image_pe 1xCxHxW, point_embedding BxTxC -> the tokens BxTxC and the image
    tokens as ``FactoredRows`` (N = HW rows of C)."""
    rows = image_embedding[0].flatten(1).t()  # (HW, C)
    pe = image_pe[0].flatten(1).t()
    batch = point_embedding.shape[0]
    queries, keys = point_embedding, FactoredRows.of_shared(rows, batch)
    for layer in transformer.layers:  # TwoWayAttentionBlock.forward, the image tokens factored
        queries = layer.token_self_attention(queries, point_embedding)
        q = queries + point_embedding
        k = keys.plus(pe)
        queries = layer.norm2(queries + token_to_image(layer.cross_attn_token_to_image, q, k, keys))
        queries = layer.norm3(queries + layer.mlp(queries))
        q = queries + point_embedding
        keys = keys.plus_low_rank(*image_to_token(layer.cross_attn_image_to_token, k, q, queries)).layer_norm(layer.norm4)
    q = queries + point_embedding
    attn = token_to_image(transformer.final_attn_token_to_image, q, keys.plus(pe), keys)
    return transformer.norm_final_attn(queries + attn), keys
