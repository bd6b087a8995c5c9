"""Hand-written toy causal LMs for structural tests (a custom norm, a non-linear residual stream)."""

import torch
from torch import nn

TOY_VOCAB = 50


class ToyScaleNorm(nn.Module):
    """ScaleNorm: ``gain * x / ||x||`` — rotation invariant, but no built-in pattern knows it."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(2.5))

    def forward(self, x):
        return self.gain * x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)


class ToyRMSNorm(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class ToyBlock(nn.Module):
    def __init__(self, width, norm, squash):
        super().__init__()
        self.norm = norm
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)
        self.squash = squash

    def forward(self, x):
        x = x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))
        return torch.tanh(x) if self.squash else x


class ToyLM(nn.Module):
    def __init__(self, width=32, layers=2, norm="rms", squash=False):
        super().__init__()
        make = (lambda: ToyScaleNorm()) if norm == "scale" else (lambda: ToyRMSNorm(width))
        self.embed = nn.Embedding(TOY_VOCAB, width)
        self.blocks = nn.ModuleList([ToyBlock(width, make(), squash and i == 0) for i in range(layers)])
        self.final_norm = make()
        self.head = nn.Linear(width, TOY_VOCAB, bias=False)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x))


def toy_calibration(batches=2):
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, TOY_VOCAB, (4, 12), generator=gen) for _ in range(batches)]


class ToyAttention(nn.Module):
    """Causal self-attention of 2 heads through ``scaled_dot_product_attention``, with query, key, value and output
    Linears of their own (``kind="plain"``), one Linear for queries and keys (``"fused_qk"``), the queries used as
    keys too (``"shared_qk"``), or each key mixed with the previous token's (``"shifted_k"``)."""

    def __init__(self, width, kind):
        super().__init__()
        self.kind, self.heads = kind, 2
        if kind == "fused_qk":
            self.qk = nn.Linear(width, 2 * width)
        else:
            self.q, self.k = nn.Linear(width, width), nn.Linear(width, width)
        self.v, self.o = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        batch, tokens, width = x.shape

        def heads(t):
            return t.view(batch, tokens, self.heads, -1).transpose(1, 2)

        if self.kind == "fused_qk":
            q, k = (heads(t) for t in self.qk(x).chunk(2, dim=-1))
        else:
            q = heads(self.q(x))
            k = q if self.kind == "shared_qk" else self.k(x)
            if self.kind == "shifted_k":
                k = k + torch.nn.functional.pad(k, (0, 0, 1, 0))[:, :-1]
            k = k if self.kind == "shared_qk" else heads(k)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, heads(self.v(x)), is_causal=True)
        return self.o(out.transpose(1, 2).reshape(batch, tokens, width))


class ToyAttentionLM(nn.Module):
    """Pre-norm blocks of a :class:`ToyAttention` only, a final norm and a head."""

    def __init__(self, kind="plain", width=32, layers=2):
        super().__init__()
        self.embed = nn.Embedding(TOY_VOCAB, width)
        self.norms = nn.ModuleList([ToyRMSNorm(width) for _ in range(layers)])
        self.attentions = nn.ModuleList([ToyAttention(width, kind) for _ in range(layers)])
        self.final_norm = ToyRMSNorm(width)
        self.head = nn.Linear(width, TOY_VOCAB, bias=False)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for norm, attention in zip(self.norms, self.attentions):
            x = x + attention(norm(x))
        return self.head(self.final_norm(x))
