"""What users run around the graph pass, each job returning a typed result the CLI prints:

- :func:`.compress.compress_job` (``fxslice compress``), :func:`.compress.inspect_job` (``fxslice inspect``),
- :func:`.evaluate.evaluate_job` (``fxslice eval``: perplexity, or lm-eval tasks via :mod:`.lmeval`),
- :func:`.finetune.finetune_job` (``fxslice finetune``: recovery, LoRA or full, language-model loss or distillation),
- :func:`.quantize.quantize_job` (``fxslice quantize``: torchao weight-only quantisation, perplexity before/after),
- :func:`.generation.generate_job` (``fxslice generate``),

and their inputs: shipped models (:mod:`.assets`), texts and windows (:mod:`.data`), plots (:mod:`.plots`).
"""
