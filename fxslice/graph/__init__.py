"""Shared graph helpers: op tables, node and parameter access, weight writes, inserted modules, edits.

Every pass reads and writes graphs through these few functions, so that an op is named once (as a
``torch.ops.aten`` overload, compared by identity) and a weight is written back one way.
"""
