"""At least 1,000,000 hostile report batches through the operator's parse and batch validator.

Random bytes, mutated and cut real batches, and batches built from hostile pieces
(``tests/operator/fuzzing.py``) are parsed as the operator's gate parses them and validated as its
servicer does (``flowmap_operator.validation`` over ``flowmap_api.validity``). Every outcome is
checked: an undecodable message, a batch refused whole, an edge refused by its index (and that
edge, and no earlier one, cannot be counted), or a batch accepted whose metadata is now normal
(normalising it again changes nothing, no edge dropped). Prints the count per outcome and the
rate; exits 1 if anything escaped.

    .venv/bin/python -m benchmarks.operator_fuzz [--inputs 1000000] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.operator.fuzzing import check, hostile_inputs  # noqa: E402

CHUNK = 50_000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    counts: dict[str, int] = {}
    done, cpu, started = 0, 0.0, time.monotonic()
    try:
        while done < args.inputs:
            batch = list(hostile_inputs(min(CHUNK, args.inputs - done), seed=args.seed * 1_000_003 + done))
            t = time.process_time()
            for raw in batch:
                outcome = check(raw)
                counts[outcome] = counts.get(outcome, 0) + 1
            cpu += time.process_time() - t
            done += len(batch)
    except Exception as e:  # the point of the exercise: report it, exit 1
        print(f"ESCAPED after {done} inputs: {e!r}")
        raise
    wall = time.monotonic() - started
    print(f"{done} inputs checked in {wall:.1f} s ({cpu:.1f} CPU-s parsing and validating, "
          f"{done / cpu:.0f} inputs/CPU-s); nothing escaped")
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
