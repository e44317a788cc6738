"""A compact BDH (Baby Dragon Hatchling) language model, after pathwaycom/bdh.

One set of weights is shared by every layer: a sparse positive encoder
(`x_sparse = relu(x @ encoder)`), linear attention with RoPE over x_sparse, a second
sparse encoding of the attention output (`y_sparse = relu(ln(attn) @ encoder_v)`),
their product `xy_sparse`, and a decoder back to n_embd with a layernorm residual.

Because the weights are shared, each layer passes xy_sparse through its own
`nn.Identity` marker (`xy_sparse.<layer>`), so a forward hook can tell layers apart.
The marker's output is [B, T, n_head * N] with unit index = head * N + n.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class BDHConfig:
    n_layer: int = 6
    n_embd: int = 256
    n_head: int = 4
    mlp_internal_dim_multiplier: int = 128
    vocab_size: int = 256
    dropout: float = 0.1

    @property
    def n_neurons(self) -> int:
        """N, the sparse units per head."""
        return self.mlp_internal_dim_multiplier * self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


def rope_frequencies(n: int, theta: float = 2.0**16) -> torch.Tensor:
    # Pairs of units share a frequency (quantised to even indices), in turns per position.
    index = (torch.arange(n, dtype=torch.float32) / 2).floor() * 2
    return 1.0 / (theta ** (index / n)) / (2 * math.pi)


class LinearAttention(nn.Module):
    """Causal linear attention where queries and keys are the same RoPE-rotated sparse code."""

    def __init__(self, config: BDHConfig):
        super().__init__()
        self.register_buffer("freqs", rope_frequencies(config.n_neurons).view(1, 1, 1, -1), persistent=False)

    @staticmethod
    def rope(phases: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        rotated = torch.stack((-v[..., 1::2], v[..., ::2]), dim=-1).view(*v.size())
        angles = (phases % 1) * (2 * math.pi)
        return v * torch.cos(angles).to(v.dtype) + rotated * torch.sin(angles).to(v.dtype)

    def forward(self, qk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        T = qk.size(-2)
        phases = torch.arange(T, device=qk.device, dtype=torch.float32).view(1, 1, -1, 1) * self.freqs
        rotated = self.rope(phases, qk)
        # Strictly causal: a token attends to the tokens before it, not to itself.
        scores = (rotated @ rotated.mT).tril(diagonal=-1)
        return scores @ v


class BDH(nn.Module):
    def __init__(self, config: BDHConfig):
        super().__init__()
        self.config = config
        nh, D, N = config.n_head, config.n_embd, config.n_neurons
        self.encoder = nn.Parameter(torch.randn(nh, D, N) * 0.02)
        self.encoder_v = nn.Parameter(torch.randn(nh, D, N) * 0.02)
        self.decoder = nn.Parameter(torch.randn(nh * N, D) * 0.02)
        self.embed = nn.Embedding(config.vocab_size, D)
        self.lm_head = nn.Parameter(torch.randn(D, config.vocab_size) * 0.02)
        self.attn = LinearAttention(config)
        self.ln = nn.LayerNorm(D, elementwise_affine=False, bias=False)
        self.drop = nn.Dropout(config.dropout)
        self.xy_sparse = nn.ModuleList([nn.Identity() for _ in range(config.n_layer)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab]. Attention is causal, so right padding (pads after the real
        tokens) never influences real positions: attention_mask is accepted and not needed."""
        B, T = input_ids.shape
        nh, N = self.config.n_head, self.config.n_neurons
        x = self.ln(self.embed(input_ids).unsqueeze(1))  # B, 1, T, D
        for layer in range(self.config.n_layer):
            x_sparse = F.relu(x @ self.encoder)  # B, nh, T, N
            attn = self.ln(self.attn(x_sparse, x))  # B, nh, T, D
            y_sparse = F.relu(attn @ self.encoder_v)  # B, nh, T, N
            xy = (x_sparse * y_sparse).transpose(1, 2).reshape(B, T, nh * N)
            xy = self.drop(self.xy_sparse[layer](xy))
            y = self.ln((xy @ self.decoder).unsqueeze(1))  # B, 1, T, D
            x = self.ln(x + y)
        return x.view(B, T, -1) @ self.lm_head


def load_checkpoint(path: str, device: str = "cpu") -> BDH:
    state = torch.load(path, map_location=device, weights_only=True)
    model = BDH(BDHConfig(**state["config"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval()
