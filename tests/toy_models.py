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
