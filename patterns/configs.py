"""Config attributes: what a stock config cannot show by its values alone.

A stock checkpoint of a slice (:mod:`fxslice.runtime.stock`) finds the attributes holding an MLP
width by their value. Some configs leave the width unset and derive it from the hidden size; the
attribute that sets it when given is named here (the stock model's parameter shapes then decide
whether it was the right one).
"""

from __future__ import annotations

from fxslice.registry import register_width_attribute

register_width_attribute("n_inner")  # GPT-2, GPT-J, GPT-BigCode: 4 * n_embd when None
