"""``trustgrad bench he``: what CKKS costs — the interface against raw OpenFHE, and a training step against plaintext.

Part 1 is ``bench he_raw`` (values/s of encrypt, aggregate, decrypt at 1M parameters x 4 workers, trustgrad over raw
OpenFHE on the same data; target <= 1.2x). Part 2 trains digits/mlp for a few steps with every pattern and key mode
that supports encryption, plaintext and encrypted with the same seed in the same run, and reports the time per step
of each and their ratio, with the ciphertext expansion the run measured.
"""

from __future__ import annotations

from typing import Any

from ..config import RunConfig
from ..options import OptionParser
from ..patterns import PATTERNS
from ..protect import key_modes
from ..run import run as run_job
from . import BENCHMARKS, BenchResult, he_raw


def step_costs(workers: int, steps: int) -> list[dict[str, Any]]:
    rows = []
    for name in PATTERNS.names():
        for keys in key_modes(PATTERNS.get(name).offers):
            base = RunConfig(workers=workers, epochs=1, max_steps=steps, progress=False).replace(pattern={"name": name})
            plain = run_job(base).summary
            secret = run_job(base.replace(crypto={"encrypt": "ckks", "keys": keys})).summary
            plain_step = plain["train_seconds"] / plain["steps"]
            secret_step = secret["train_seconds"] / secret["steps"]
            rows.append(
                {
                    "pattern": f"{name} ({plain['schedule']})" if name == "ps" else name,
                    "keys": keys,
                    "plain_step_s": plain_step,
                    "encrypted_step_s": secret_step,
                    "ratio": secret_step / plain_step,
                    "ciphertext_expansion": secret.get("ciphertext_expansion"),
                    "accuracy_gap": abs(secret["test_accuracy"] - plain["test_accuracy"]),
                }
            )
    return rows


@BENCHMARKS.register("he")
def _cli(args: list[str]) -> BenchResult:
    parser = OptionParser(prog="trustgrad bench he", description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=1_000_000, help="values per worker vector (part 1)")
    parser.add_argument("--workers", type=int, default=4, help="workers (both parts)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs (part 1)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per job (part 2)")
    ns = parser.parse_args(args)
    raw = he_raw.run(ns.values, ns.workers, ns.repeats)
    rows = step_costs(ns.workers, ns.steps)
    lines = [he_raw.table(raw), "", f"digits/mlp, {ns.workers} workers, {ns.steps} steps, same seed:", ""]
    lines += [
        "| pattern | keys | plaintext s/step | encrypted s/step | encrypted / plaintext | ciphertext expansion |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['pattern']} | {r['keys']} | {r['plain_step_s']:.4f} | {r['encrypted_step_s']:.4f} "
            f"| {r['ratio']:.1f}x | {r['ciphertext_expansion']}x |"
        )
    return BenchResult("he", "\n".join(lines), {"raw": raw, "steps": rows}, raw["passed"])
