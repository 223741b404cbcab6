"""A tiny class-conditional autoregressive transformer over discrete image tokens (ARRA's toy LlamaGen).

`ar_transformer_tiny`: forward(tokens (B, L), y (B,)) → logits (B, L, K). Position t's input is
[class token, tok_1, …, tok_{L-1}][t], so its hidden state is the ordinary next-token state that
predicts tok_t (ARRA's <HYBNEXT> is this position, not a new token). Taps: `blocks.<i>` (B, L, d)
hidden states of layer i, `head` the logits. `generate(y)` samples L tokens in raster order.
"""

from __future__ import annotations

import torch
from torch import nn

from still.registry import register_model


class ARTransformer(nn.Module):
    """Causal pre-norm transformer: class embedding as the first input, token embeddings after it."""

    def __init__(self, vocab: int, num_classes: int, seq_len: int, dim: int = 64, depth: int = 2,
                 heads: int = 4, mlp_ratio: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.vocab, self.seq_len = vocab, seq_len
        self.cls = nn.Embedding(num_classes, dim)
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(seq_len, dim) * 0.02)
        self.blocks = nn.ModuleList([
            nn.TransformerEncoderLayer(dim, heads, mlp_ratio * dim, dropout, batch_first=True, norm_first=True)
            for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """tokens (B, L') with L' ≤ L, y (B,) → logits (B, L', K); logits[:, t] predict tokens[:, t]."""
        b, n = tokens.shape
        if n > self.seq_len:
            raise ValueError(f"ARTransformer: {n} tokens > seq_len {self.seq_len}")
        h = torch.cat([self.cls(y).unsqueeze(1), self.tok(tokens[:, : n - 1])], 1) + self.pos[:n]
        mask = nn.Transformer.generate_square_subsequent_mask(n, device=h.device, dtype=h.dtype)
        for blk in self.blocks:
            h = blk(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))

    @torch.no_grad()
    def generate(self, y: torch.Tensor, temperature: float = 1.0, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        """(B,) class ids → (B, L) sampled tokens (raster order, no KV cache: L forward passes)."""
        was = self.training
        self.eval()
        out = torch.zeros(len(y), 0, dtype=torch.long, device=y.device)
        for _ in range(self.seq_len):
            logits = self.forward(torch.cat([out, out.new_zeros(len(y), 1)], 1), y)[:, -1] / temperature
            nxt = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator)
            out = torch.cat([out, nxt], 1)
        self.train(was)
        return out


@register_model("ar_transformer_tiny", paper="Sun et al. LlamaGen: Autoregressive Model Beats Diffusion (2024), "
                "toy scale")
def ar_transformer_tiny(num_classes: int = 10, vocab: int = 64, seq_len: int = 49, dim: int = 64, depth: int = 2,
                        heads: int = 4, input_shape: object = None) -> ARTransformer:
    """~110k parameters at the defaults: 2 layers, d = 64, 4 heads, K = 64 codes, 49 tokens (7×7 patches)."""
    return ARTransformer(vocab, num_classes, seq_len, dim, depth, heads)
