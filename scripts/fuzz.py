"""Fuzz fxslice over random small models of every supported family (the property of tests/test_fuzz.py).

    python scripts/fuzz.py --examples 200 --seed 0

Draws ``--examples`` cases with the strategy of ``tests/fuzz_models.py``, shared out evenly over the
families (no shrinking: every failure is recorded and the run goes on), checks each with
``tests/test_fuzz.py::check_case``, prints the examples per family and mode (with those refused as a
budget out of reach, and those failed), per dtype and extra check (streamed, saved) and, for every
failure, the error and a snippet that reproduces it. Exit code 1 if any example failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
warnings.filterwarnings("ignore", category=UserWarning)

import torch  # noqa: E402
import transformers  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from tabulate import tabulate  # noqa: E402
from tqdm import tqdm  # noqa: E402

from fuzz_models import DTYPES, MODES, SPECS, FuzzCase, fuzz_cases  # noqa: E402
from test_fuzz import check_case  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200, help="cases to draw (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (default: %(default)s)")
    parser.add_argument("--families", nargs="*", choices=sorted(SPECS), help="restrict to these families")
    parser.add_argument("--modes", nargs="*", choices=MODES, help="restrict to these modes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # save_pretrained / from_pretrained of the streamed and stock cases

    modes = tuple(args.modes or MODES)
    counts: Counter = Counter()  # (family, mode, outcome) -> cases
    extras: Counter = Counter()  # (dtype | "streamed" | "saved", outcome) -> cases
    failures: list[tuple[FuzzCase, str]] = []
    bar = tqdm(total=args.examples, desc="fxslice fuzz", unit="case")

    def check(case: FuzzCase) -> None:
        try:
            outcome = check_case(case)
        except Exception as exc:  # recorded, not raised: hypothesis would stop at the first failure
            outcome = "failed"
            failures.append((case, "".join(traceback.format_exception_only(type(exc), exc)).strip()))
            bar.set_postfix(failed=len(failures))
        counts[case.family, case.mode, outcome] += 1
        for kind in [case.dtype] + ["streamed"] * case.streamed + ["saved"] * case.saved:
            extras[kind, outcome] += 1
        bar.update()

    # hypothesis concentrates a single run on a few families (it mutates earlier examples): the
    # examples are shared out over the families instead, one generate-only run per family
    families = sorted(args.families or SPECS)
    started = time.perf_counter()
    for number, family in enumerate(families):
        share = args.examples // len(families) + (number < args.examples % len(families))
        if share == 0:
            continue
        run = seed(args.seed + number)(settings(
            max_examples=share, deadline=None, database=None, phases=[Phase.generate],
            suppress_health_check=list(HealthCheck))(given(case=fuzz_cases(families=[family], modes=modes))(check)))
        run()
    bar.close()
    elapsed = time.perf_counter() - started

    def cell(count) -> str:
        ok, refused, bad = count("ok"), count("refused"), count("failed")
        notes = [f"{refused} refused"] * bool(refused) + [f"{bad} failed"] * bool(bad)
        return f"{ok + refused + bad}" + (f" ({', '.join(notes)})" if notes else "")

    families = sorted({family for family, _, _ in counts})
    rows = [[family] + [cell(lambda o, f=family, m=mode: counts[f, m, o]) for mode in modes] for family in families]
    rows.append(["total"] + [cell(lambda o, m=mode: sum(counts[f, m, o] for f in families)) for mode in modes])
    print(tabulate(rows, headers=["family"] + list(modes), tablefmt="github"))
    kinds = list(DTYPES) + ["streamed", "saved"]
    print()
    print(tabulate([[kind, cell(lambda o, k=kind: extras[k, o])] for kind in kinds], headers=["cases", "examples"],
                   tablefmt="github"))
    total = sum(counts.values())
    print(f"\n{total} examples in {elapsed:.0f} s ({elapsed / max(total, 1):.1f} s each), {len(failures)} failed")
    for number, (case, error) in enumerate(failures, 1):
        print(f"\n--- failure {number}: {case.describe()}\n{error}\nreproducer:\n{case.reproducer()}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
