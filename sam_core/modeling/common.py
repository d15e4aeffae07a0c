"""Building blocks shared by the encoder and decoder."""

from __future__ import annotations

import math
from typing import Type

import torch
import torch.nn.functional as F
from torch import nn


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, use_sdpa: bool = True
) -> torch.Tensor:
    """Scaled dot-product attention: q (B, heads, Nq, d), k and v (B, heads, Nk, d) -> (B, heads, Nq, d).

    A batch of 1 on either side broadcasts against B.

    ``use_sdpa=False`` is the reference path, the official decoder's arithmetic op for op.
    """
    if use_sdpa:
        if k.shape[0] == 1 and q.shape[0] > 1:
            # Keys shared by the batch: every query row attends independently, so run all of
            # them as one sequence against the one copy of k and v.
            b, h, n, d = q.shape
            out = F.scaled_dot_product_attention(q.transpose(0, 1).reshape(1, h, b * n, d), k, v)
            return out.reshape(h, b, n, -1).transpose(0, 1)
        batch = max(q.shape[0], k.shape[0])
        q, k, v = (t.expand(batch, -1, -1, -1) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v)
    attn = q @ k.permute(0, 1, 3, 2) / math.sqrt(q.shape[-1])  # (B, heads, Nq, Nk)
    return torch.softmax(attn, dim=-1) @ v


class MLPBlock(nn.Module):
    """Linear -> activation -> Linear (the transformer feed-forward block)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (decoder heads)."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims_in, dims_out))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        x = self.layers[-1](x)
        return torch.sigmoid(x) if self.sigmoid_output else x


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a BxCxHxW tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The official arithmetic, with x - u computed once and the per-channel weight and bias
        # as second operands (same results; a broadcast first operand is a slow loop on CPU).
        centred = x - x.mean(1, keepdim=True)
        s = centred.pow(2).mean(1, keepdim=True)
        x = centred / torch.sqrt(s + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]
