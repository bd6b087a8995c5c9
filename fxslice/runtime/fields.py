"""The fields of ``fxslice.json`` that loading and the jobs read, checked by type before any file of the
folder is opened: a corrupt field is one :class:`FxSliceError` naming ``fxslice.json`` and the field,
never a ``TypeError`` or ``KeyError`` deep inside loading."""

from __future__ import annotations

from ..errors import FxSliceError, dtype_named, whole
from .weightfiles import check_index


def check_fields(record: dict, where: str) -> None:
    """Refuse a record whose fields loading would trip over (``where``: the record's path)."""
    if record["vocab_size"] < 1:
        raise FxSliceError(f"{where} is corrupted: 'vocab_size' must be a positive integer, got {record['vocab_size']!r}")
    check_index(record.get("weights"), where)
    cache = record.get("generator")
    if cache is not None and not (isinstance(cache, dict) and isinstance(cache.get("max_cache_len"), int)
                                  and isinstance(cache.get("program_sha256"), str)):
        raise FxSliceError(f"{where} is corrupted: 'generator' lacks max_cache_len or program_sha256")
    if cache is not None:
        for field in ("max_cache_len", "batch_size"):
            value = cache.get(field, 1)
            if not whole(value) or value < 1:
                raise FxSliceError(f"{where} is corrupted: generator.{field} must be a positive integer, got {value!r}")
    compiled = record.get("compiled")
    if compiled is not None and not isinstance(compiled, dict):
        raise FxSliceError(f"{where} is corrupted: 'compiled' is a {type(compiled).__name__}, not an object of "
                           "packages by device")
    if "dtype" in record and dtype_named(record["dtype"]) is None:
        raise FxSliceError(f"{where} is corrupted: 'dtype' is {record['dtype']!r}, not a torch dtype name")
    for field in ("head", "inserted"):  # what fine-tuning reads
        if field in record and not isinstance(record[field], list):
            raise FxSliceError(f"{where} is corrupted: '{field}' is a {type(record[field]).__name__}, not a list")
    if "inserted" in record and not all(isinstance(m, dict) and isinstance(m.get("name"), str) for m in record["inserted"]):
        raise FxSliceError(f"{where} is corrupted: every entry of 'inserted' must be an object with a 'name'")
