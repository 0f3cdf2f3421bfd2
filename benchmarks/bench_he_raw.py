"""Print trustgrad's CKKS throughput against raw OpenFHE: ``python benchmarks/bench_he_raw.py [values] [workers]``."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before OpenFHE loads: contention makes it ~10x slower

from trustgrad.bench.he_raw import run, table  # noqa: E402


def main() -> None:
    values = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    print(table(run(values, workers)))


if __name__ == "__main__":
    main()
