"""Zero-shot evaluation with the LM Evaluation Harness (``lm-eval``) on dense or sliced models.

:class:`FxSliceLM` is an lm-eval model class over anything that maps ``input_ids`` to logits: a
Hugging Face model, a sliced GraphModule, or a folder loaded with :func:`fxslice.load`. Standard
task names (piqa, arc_easy, hellaswag, winogrande, ...) work where their datasets are available;
offline, fxslice ships ``kjv_verse_end`` (choose the true end of a KJV verse among four).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import FxSliceError
from ..hf import device_of, logits_of

LOCAL_TASKS = ("kjv_verse_end",)


def _lm_base():
    from lm_eval.api.model import TemplateLM

    return TemplateLM


class FxSliceLM(_lm_base()):
    """lm-eval model: loglikelihood (batched), loglikelihood_rolling, greedy generate_until."""

    def __init__(self, model, tokenizer, batch_size: int = 4, max_length: int = 2048, device: str = "cpu",
                 max_gen_toks: int = 64):
        super().__init__()
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size_per_gpu = int(batch_size)
        self._max_length, self._device, self.max_gen_toks = int(max_length), torch.device(device), int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else 0

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return logits_of(self.model, ids.to(self._device)).float()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether greedy decoding reproduces it, per request."""
        results: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        prepared = []
        for index, (_, context, continuation) in enumerate(requests):
            tokens = (context + continuation)[-(self.max_length + 1):]
            prepared.append((index, tokens[:-1], len(continuation)))
        prepared.sort(key=lambda item: -len(item[1]))  # similar lengths together, longest first
        bar = tqdm(total=len(prepared), desc="lm-eval loglikelihood", disable=disable_tqdm)
        for start in range(0, len(prepared), self.batch_size_per_gpu):
            chunk = prepared[start:start + self.batch_size_per_gpu]
            width = max(len(tokens) for _, tokens, _ in chunk)
            ids = torch.full((len(chunk), width), self.eot_token_id, dtype=torch.long)
            for row, (_, tokens, _) in enumerate(chunk):
                ids[row, : len(tokens)] = torch.tensor(tokens)  # right padding: causal, so no mask needed
            logprobs = F.log_softmax(self._logits(ids), dim=-1)
            for row, (index, tokens, n_cont) in enumerate(chunk):
                targets = torch.tensor(requests[index][2][-n_cont:] if n_cont else [], dtype=torch.long)
                steps = logprobs[row, len(tokens) - n_cont: len(tokens)]
                picked = steps.gather(-1, targets[:, None]).squeeze(-1)
                results[index] = (float(picked.sum()), bool((steps.argmax(-1) == targets).all()))
            bar.update(len(chunk))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        scores = []
        for request in tqdm(requests, desc="lm-eval rolling loglikelihood", disable=disable_tqdm):
            tokens = self.tok_encode(request.args[0])
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)]
            pieces = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            scores.append(sum(score for score, _ in pieces))
        return scores

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding, re-running the prompt each step (simple; see fxslice.runtime.generate for a KV cache)."""
        outputs = []
        for request in tqdm(requests, desc="lm-eval generate", disable=disable_tqdm):
            context, options = request.args
            until = options.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            budget = int(options.get("max_gen_toks", self.max_gen_toks))
            tokens = self.tok_encode(context)[-(self.max_length - budget):]
            generated: list[int] = []
            text = ""
            for _ in range(budget):
                next_token = int(self._logits(torch.tensor([tokens + generated]))[0, -1].argmax())
                if next_token == self.eot_token_id:
                    break
                generated.append(next_token)
                text = self.tok_decode(generated)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
        return outputs


def task_manager():
    """lm-eval TaskManager that also knows fxslice's local tasks (written with absolute data paths)."""
    from lm_eval.tasks import TaskManager

    from .assets import cache_dir

    source = files("fxslice.jobs").joinpath("tasks")
    include = cache_dir() / "lm_eval_tasks"
    include.mkdir(parents=True, exist_ok=True)
    for name in LOCAL_TASKS:
        data = Path(str(source.joinpath(f"{name}.jsonl")))
        template = source.joinpath(f"{name}.yaml").read_text()
        (include / f"{name}.yaml").write_text(template.replace("@DATA@", str(data)))
    return TaskManager(include_path=str(include))


def evaluate_tasks(model, tokenizer, tasks: list[str], batch_size: int = 4, limit: Optional[float] = None,
                   num_fewshot: Optional[int] = None, max_length: int = 2048) -> dict:
    """Run ``lm_eval.simple_evaluate`` on ``tasks``; returns lm-eval's results dict."""
    from lm_eval import simple_evaluate

    if tokenizer is None:
        raise FxSliceError("zero-shot evaluation needs the model's tokenizer")
    lm = FxSliceLM(model, tokenizer, batch_size=batch_size, max_length=max_length,
                   device=str(device_of(model)))
    manager = task_manager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise FxSliceError(f"unknown lm-eval task(s): {', '.join(unknown)} (local tasks: {', '.join(LOCAL_TASKS)})")
    return simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                           batch_size=batch_size, log_samples=False)


def results_table(results: dict) -> str:
    from lm_eval.utils import make_table

    return make_table(results)
