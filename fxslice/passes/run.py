"""One compression as it goes through the passes: what the user gave, then each pass's result.

:func:`fxslice.compress` fills the given fields and runs ``PASSES`` (:mod:`fxslice.passes`) in
order; each pass's ``step(run)`` reads the fields of earlier passes and sets its own (the field
comments name the pass). The passes' own functions take and return these values explicitly; the
steps only connect them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import nn
from torch.fx import GraphModule

from ..calibration import Batch
from ..hf import ModelSpec
from ..options import Options
from ..result import Stopwatch

if TYPE_CHECKING:
    from ..graph.store import Weights
    from ..source import ModelSource
    from .p3_analyse import Structure
    from .p4_attention import AttentionSearch
    from .p4_mlps import MLPSearch
    from .p5_fuse import Plan
    from .p6_widths import Widths
    from .slice_record import Slice


@dataclass
class Run:
    """The given fields first, then one field per pass (numbered), filled in run order."""

    module: Optional[nn.Module]  # what is captured: the user's model, or a checkpoint's model without weights
    # (dropped after pass 2)
    spec: ModelSpec
    options: Options
    batches: list[Batch]
    store: Callable[[GraphModule], "Weights"]  # the weight store of the canonical graph
    compute: torch.device  # where calibration runs
    watch: Stopwatch
    progress: bool = True
    activation_dir: Optional[Path] = None  # where cached activations wait between blocks (None: memory)
    source: Optional["ModelSource"] = None  # how to capture the model again (a checkpoint's; 2 for a module)

    gm: Optional[GraphModule] = None  # 1 capture, 2 canonicalise (then edited in place by 5 and 7)
    weights: Optional["Weights"] = None  # 2
    structure: Optional["Structure"] = None  # 3 analyse
    mlps: Optional["MLPSearch"] = None  # 4 mlps
    attentions: Optional["AttentionSearch"] = None  # 4 mlps (attention values)
    plan: Optional["Plan"] = None  # 5 fuse
    widths: Optional["Widths"] = None  # 6 widths
    slice: Optional["Slice"] = None  # 7 rotate
    eigenvalues: list[Optional[torch.Tensor]] = field(default_factory=list)  # 7
