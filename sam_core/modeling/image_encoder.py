"""ViT image encoder: windowed + global attention with decomposed relative position, and a neck."""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, MLPBlock


class ImageEncoderViT(nn.Module):
    """Bx3xSxS normalised, padded image -> Bx(out_chans)x(S/patch)x(S/patch) embedding."""

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed  # (B, H, W, C)
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))  # (B, out_chans, H, W)


class Block(nn.Module):
    """Pre-norm transformer block; windowed attention when ``window_size > 0``, else global."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        window_size: int,
        input_size: Tuple[int, int],
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        attn_size = input_size if window_size == 0 else (window_size, window_size)
        self.attn = Attention(dim, num_heads=num_heads, input_size=attn_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act=nn.GELU)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            H, W = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)  # (B*nW, ws, ws, C)
            x = self.attn(x)
            x = window_unpartition(x, self.window_size, pad_hw, (H, W))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class Attention(nn.Module):
    """Multi-head self-attention over a 2-D token grid with decomposed relative position bias."""

    def __init__(self, dim: int, num_heads: int, input_size: Tuple[int, int]) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
        # "sdpa": fused attention, the rel-pos bias as a dense mask in fp32 and folded in half
        # precision; "folded": the bias always folded into q and k (no N x N tensor, flash-eligible);
        # "reference": the official arithmetic.
        self.backend = "sdpa"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        B, H, W, _ = x.shape
        heads = self.num_heads
        # (B, N, 3, heads, hd) -> 3 x (B, heads, N, hd): 4-D, as the fused kernels require.
        q, k, v = self.qkv(x).reshape(B, H * W, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        rel_h, rel_w = decomposed_rel_pos(q.reshape(B * heads, H * W, -1), self.rel_pos_h, self.rel_pos_w,
                                          (H, W), (H, W))  # (B*heads, H, W, H), (B*heads, H, W, W)
        # The dense bias costs B*heads*N*N elements; in half precision the folded form also runs
        # on flash kernels, so "sdpa" uses it there (fp32 keeps the dense mask, faster in fp32).
        half = q.dtype in (torch.float16, torch.bfloat16)
        if self.backend == "folded" or (self.backend == "sdpa" and half):
            x = folded_rel_pos_attention(q, k, v, rel_h.view(B, heads, H, W, H), rel_w.view(B, heads, H, W, W),
                                         self.scale)
        elif self.backend == "sdpa":
            bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, heads, H * W, H * W)
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, heads, N, hd)
        else:
            # Reference path: the official arithmetic, op for op, on (B*heads, N, hd).
            q, k, v = (t.reshape(B * heads, H * W, -1) for t in (q, k, v))
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B*heads, N, N)
            x = add_rel_pos(attn, rel_h, rel_w).softmax(dim=-1) @ v
        # (B, heads, H, W, hd) -> (B, H, W, heads, hd) -> (B, H, W, C)
        x = x.reshape(B, heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
        return self.proj(x)


def folded_rel_pos_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(scale * q k^T + rel_h[q, kh] + rel_w[q, kw]) v without an N x N bias tensor.

    The bias is a dot product too: append rel_h / scale and rel_w / scale to each query and the
    one-hot row and column of each key to the key, so q' . k' * scale is the biased logit, and any
    fused kernel (flash included) can run it. q, k, v: (..., N, d) with N = H*W; rel_h
    (..., H, W, H), rel_w (..., H, W, W). Returns (..., N, d).
    """
    *lead, H, W, _ = rel_h.shape
    N, d = H * W, q.shape[-1]
    folded = d + H + W
    pad = -folded % 8  # fused kernels want head sizes in multiples of 8
    rows = torch.arange(H, device=q.device).repeat_interleave(W)  # key n = (row, col)
    cols = torch.arange(W, device=q.device).repeat(H)
    key_pos = torch.cat([F.one_hot(rows, H), F.one_hot(cols, W)], dim=-1).to(q.dtype)  # (N, H+W)
    q_f = torch.cat([q, rel_h.reshape(*lead, N, H) / scale, rel_w.reshape(*lead, N, W) / scale], dim=-1)
    k_f = torch.cat([k, key_pos.expand(*lead, N, H + W)], dim=-1)
    # Flash kernels need one head size for q, k and v: zero-pad all three to it.
    q_f, k_f = F.pad(q_f, (0, pad)), F.pad(k_f, (0, pad))
    v_f = F.pad(v, (0, folded + pad - d))
    return F.scaled_dot_product_attention(q_f, k_f, v_f, scale=scale)[..., :d]


def window_partition(x: torch.Tensor, window_size: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """(B, H, W, C) -> (B*num_windows, ws, ws, C) windows, zero-padding H, W up to multiples of ws.

    Returns the windows and the padded size (Hp, Wp).
    """
    B, H, W, C = x.shape
    pad_h = (window_size - H % window_size) % window_size
    pad_w = (window_size - W % window_size) % window_size
    if pad_h > 0 or pad_w > 0:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    # (B, Hp/ws, ws, Wp/ws, ws, C) -> (B, Hp/ws, Wp/ws, ws, ws, C)
    x = x.view(B, Hp // window_size, window_size, Wp // window_size, window_size, C)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, C)
    return windows, (Hp, Wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, pad_hw: Tuple[int, int], hw: Tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B*nW, ws, ws, C) -> (B, H, W, C) without padding."""
    Hp, Wp = pad_hw
    H, W = hw
    B = windows.shape[0] // (Hp * Wp // window_size // window_size)
    x = windows.view(B, Hp // window_size, Wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)
    if Hp > H or Wp > W:
        x = x[:, :H, :W, :].contiguous()
    return x


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative position embeddings (L, C) -> (q_size, k_size, C), resampled if L does not fit."""
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        # (1, C, L) linear interpolation to (1, C, max_rel_dist)
        resized = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1),
            size=max_rel_dist,
            mode="linear",
        )
        rel_pos = resized.reshape(-1, max_rel_dist).permute(1, 0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative_coords.long()]


def decomposed_rel_pos(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: Tuple[int, int],
    k_size: Tuple[int, int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two factors of MViTv2's decomposed relative position bias.

    q: (B, q_h*q_w, C) unscaled queries. Returns rel_h (B, q_h, q_w, k_h) and rel_w
    (B, q_h, q_w, k_w); the attention bias is ``rel_h[..., :, None] + rel_w[..., None, :]``
    reshaped to (B, q_h*q_w, k_h*k_w).
    """
    q_h, q_w = q_size
    k_h, k_w = k_size
    Rh = get_rel_pos(q_h, k_h, rel_pos_h)  # (q_h, k_h, C)
    Rw = get_rel_pos(q_w, k_w, rel_pos_w)  # (q_w, k_w, C)
    B, _, C = q.shape
    r_q = q.reshape(B, q_h, q_w, C)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw)
    return rel_h, rel_w


def add_rel_pos(attn: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor) -> torch.Tensor:
    """attn (B, q_h*q_w, k_h*k_w) plus the bias of :func:`decomposed_rel_pos`'s rel_h
    (B, q_h, q_w, k_h) and rel_w (B, q_h, q_w, k_w), added as the official code adds them."""
    B, q_h, q_w, k_h = rel_h.shape
    k_w = rel_w.shape[-1]
    attn = attn.view(B, q_h, q_w, k_h, k_w) + rel_h[..., :, None] + rel_w[..., None, :]
    return attn.view(B, q_h * q_w, k_h * k_w)


def add_decomposed_rel_pos(
    attn: torch.Tensor,
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: Tuple[int, int],
    k_size: Tuple[int, int],
) -> torch.Tensor:
    """The official helper of that name: attn (B, q_h*q_w, k_h*k_w) plus the decomposed
    relative position bias of q (B, q_h*q_w, C), same shape out."""
    return add_rel_pos(attn, *decomposed_rel_pos(q, rel_pos_h, rel_pos_w, q_size, k_size))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: (B, 3, S, S) -> (B, S/p, S/p, C)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)
