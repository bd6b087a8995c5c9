"""The generate job: text from a saved sliced folder with its KV-cache program."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..errors import FxSliceError


@dataclass
class GenerationResult:
    text: str
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)


def generate_job(folder: str, prompt: str, max_new_tokens: int = 48, **sampling) -> GenerationResult:
    """Continue ``prompt`` with the folder's model (greedy, or ``do_sample`` with the sampling options
    of :func:`fxslice.runtime.generate.generate`)."""
    from ..runtime.load import load

    model, tokenizer = load(folder)
    if tokenizer is None:
        raise FxSliceError(f"{folder} has no tokenizer files")
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] == 0:
        raise FxSliceError(f"the prompt {prompt!r} has no tokens: give --prompt some text")
    started = time.perf_counter()
    tokens = model.generate(ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id, **sampling)
    seconds = time.perf_counter() - started
    return GenerationResult(tokenizer.decode(tokens[0], skip_special_tokens=True), tokens.shape[1] - ids.shape[1],
                            seconds)
