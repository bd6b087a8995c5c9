"""Log lines of other packages' imports that say nothing to a CPU user of fxslice, filtered out.

transformers imports torchao whenever it is installed (its torchao quantiser module), and torchao's
import then logs one warning per CUDA kernel library a CPU build of torch cannot load, and torch's
pytree one deprecation note per enum torchao registers. Only those exact lines are dropped; every
other record of those loggers passes."""

from __future__ import annotations

import logging

IMPORT_NOISE = {
    "torchao": lambda message: message.startswith("Failed to load ") and ".so" in message,
    "torch.utils._pytree": lambda message: "is an Enum subclass and is now natively supported" in message,
}


class _DropImportNoise(logging.Filter):
    def __init__(self, is_noise):
        super().__init__()
        self.is_noise = is_noise

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.is_noise(record.getMessage())


def filter_import_noise() -> None:
    """Attach the filters once (idempotent)."""
    for name, is_noise in IMPORT_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropImportNoise) for f in logger.filters):
            logger.addFilter(_DropImportNoise(is_noise))
