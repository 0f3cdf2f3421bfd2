"""``trustgrad bench scale``: a real model at real size, every figure a ratio to an anchor measured in the same run.

The job: ``--model`` (default ResNet-18, CIFAR stem) on ``synthetic-cifar`` with crop-flip augmentation, ``--workers``
allreduce workers, ``--steps`` steps of ``--batch-size`` per worker. Measured, in this order:

1. the same job under PyTorch's DDP (gloo, ``forward_sync_buffers=False``: BatchNorm statistics are averaged by neither,
   trustgrad averages them after the step) on the same batches: the anchor of step time;
2. trustgrad's ``allreduce``: step time / DDP's (both the step loop alone: no evaluation, no start-up);
3. trustgrad's ``allreduce --proof record``: (step loop + finalising the proof) / the loop without it - 1; the CPU
   recording takes (training thread in the hook + the writer thread) / the coordinator's loop; the proof's size per
   epoch (bytes / steps x steps per epoch), and the time ``trustgrad verify`` takes / training time;
   beside each wall-clock ratio, the CPU seconds of the step loops (``time.process_time``: every thread of a process,
   gloo's and the proof writer's included; all ranks for allreduce vs DDP, the coordinator for recording), which
   another job's load on a shared machine does not swing as it swings wall time;
   1-3 run ``--repeats`` rounds, interleaved (each round runs all three, in an order that rotates from round to round,
   so a drift in the machine's load falls on each alike); each ratio is given twice: of the fastest runs (one burst of
   load on a shared machine does not decide it) and the median of the rounds' own ratios (each round's runs are
   neighbours in time, so they share its load);
4. one audit replay (a claim's gradient recomputed, as ``audit.Auditor.replay`` does) / one training step; the cost
   of audits at rates 1, 0.1 and 0.01 follows as rate x that (derived, not measured separately);
5. ``ps`` with CKKS, shared and threshold keys, for ``--ckks-steps`` steps, against plaintext ``ps`` on the same steps:
   step time, bytes on the wire and ciphertext expansion, and where the time goes (encryption, aggregation and
   decryption seconds per step; the workers' phases run in parallel, so they are per worker);
6. peak resident memory per process (VmHWM) of every run.

Timings here are at the mercy of a shared machine: they are printed, never asserted (docs/models.md).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..options import OptionParser
from . import BENCHMARKS, BenchResult


def _parse(args: list[str]) -> argparse.Namespace:
    p = OptionParser(prog="trustgrad bench scale", description=__doc__)
    p.add_argument("--model", default="resnet18", help="zoo model (default resnet18; cnn-bn for a quick look)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--k", type=int, default=5, help="steps between proof checkpoints")
    p.add_argument(
        "--repeats", type=int, default=5, help="rounds of DDP, allreduce and proof runs (fastest and median reported)"
    )
    p.add_argument("--ckks-steps", type=int, default=1, help="steps of each CKKS run (0: no CKKS rows)")
    p.add_argument(
        "--ckks-sample", type=float, default=0.1, help="share of the ciphertexts timed when the CKKS job does not fit"
    )
    opts = p.parse_args(args)
    if opts.ckks_steps < 0:
        p.error(f"--ckks-steps must be >= 0, got {opts.ckks_steps}")
    if not 0 < opts.ckks_sample <= 1:
        p.error(f"--ckks-sample must be in (0, 1], got {opts.ckks_sample}")
    for name in ("workers", "steps", "batch_size", "k", "repeats"):
        if getattr(opts, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(opts, name)}")
    if opts.workers * opts.batch_size * opts.steps > 2048:  # synthetic-cifar's training set, one epoch
        p.error("--workers x --batch-size x --steps must fit one epoch of synthetic-cifar (2048 samples)")
    return opts


def _ddp_rank(ctx: Any, cfg: Any) -> dict[str, float]:
    """One rank of the anchor: the same model, batches and SGD under torch's DistributedDataParallel."""
    from torch.nn.parallel import DistributedDataParallel

    from ..augment import Augment
    from ..data import BatchPlan, load_dataset
    from ..models import build_model, loss_for
    from ..train import peak_rss_bytes

    torch.set_num_threads(cfg.threads)
    ds = load_dataset(cfg.dataset)
    model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, cfg.seed, cfg.model)
    loss_fn = loss_for(model)
    ddp = DistributedDataParallel(model, forward_sync_buffers=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    plan, augment = BatchPlan.for_run(cfg, ds, cfg.workers), Augment(cfg.augment, cfg.seed)
    ddp.train()
    started, cpu = time.perf_counter(), time.process_time()
    for step in range(cfg.max_steps):
        idx = torch.from_numpy(plan.at(ctx.rank, step))
        opt.zero_grad()
        loss_fn(ddp(augment.apply(ds.x_train[idx], ctx.rank, step)), ds.y_train[idx]).backward()
        opt.step()
    return {
        "train_seconds": time.perf_counter() - started,
        "train_cpu_seconds": time.process_time() - cpu,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def _audit_replay_seconds(cfg: Any, repeats: int = 3) -> float:
    """Median seconds of one claim's replay: a replica at W0 recomputing worker 0's gradient of step 0."""
    from ..augment import Augment
    from ..data import BatchPlan, load_dataset
    from ..models import build_model
    from ..replica import Replica, make_optimizer

    ds = load_dataset(cfg.dataset)
    model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, cfg.seed, cfg.model)
    replica = Replica(model, make_optimizer(model, cfg.lr))
    idx = torch.from_numpy(BatchPlan.for_run(cfg, ds, cfg.workers).at(0, 0))
    x = Augment(cfg.augment, cfg.seed).apply(ds.x_train[idx], 0, 0)
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    times = []
    try:
        for _ in range(repeats):
            started = time.perf_counter()
            replica.compute_gradients(x, ds.y_train[idx])
            times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(before)
    return sorted(times)[len(times) // 2]


def _peak(ranks: list[Any]) -> int:
    return max((r.get("peak_rss_bytes", 0) for r in ranks if r), default=0)


def _loop_seconds(result: Any) -> float:
    """The slowest worker's step loop (``train.py``'s ``step_seconds``: no start-up, no evaluation)."""
    return max(r["step_seconds"] for r in result.ranks if r and "step_seconds" in r)


def _cpu(result: Any, coordinator_only: bool = False) -> float:
    """CPU seconds of the step loops (every thread of each process), over every rank or the coordinator's alone."""
    return sum(r["step_cpu_seconds"] for r in result.ranks if r and (r.get("coordinator") or not coordinator_only))


def _recording_cpu(result: Any) -> float:
    """What recording takes from the coordinator, independent of the machine's load: its training thread's time in
    the hook (snapshots, finalising) plus the writer thread's CPU time, over the coordinator's step loop."""
    s = result.summary
    loop = next(r["step_seconds"] for r in result.ranks if r and r.get("coordinator"))
    return (s.get("proof_hook_seconds", 0.0) + s.get("proof_writer_cpu_seconds", 0.0)) / loop


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _rounds(base: Any, opts: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """DDP, allreduce and allreduce with a proof in each of ``--repeats`` rounds, their order rotating from round to
    round; per kind its fastest run and per round its ratios; the last round's proof."""
    from ..launch import spawn
    from ..run import run

    times: dict[str, list[float]] = {"ddp": [], "plain": [], "rec": []}
    # CPU seconds: all ranks' loops (ddp, plain) and the coordinator's (plain_coord, rec), which alone records
    work: dict[str, list[float]] = {"ddp": [], "plain": [], "plain_coord": [], "rec": []}
    cpu, peaks, last = [], {"ddp": 0, "allreduce": 0, "proof": 0}, {}

    def ddp(i: int) -> None:
        ranks = spawn(_ddp_rank, opts.workers, (base,), timeout=base.timeout)
        times["ddp"].append(max(r["train_seconds"] for r in ranks))
        work["ddp"].append(sum(r["train_cpu_seconds"] for r in ranks))
        peaks["ddp"] = max(peaks["ddp"], _peak(ranks))

    def plain(i: int) -> None:
        done = run(base.replace(out=str(tmp / f"plain{i}")))
        times["plain"].append(_loop_seconds(done))
        work["plain"].append(_cpu(done))
        work["plain_coord"].append(_cpu(done, coordinator_only=True))
        peaks["allreduce"] = max(peaks["allreduce"], _peak(done.ranks))
        last["summary"] = done.summary

    def rec(i: int) -> None:
        proved = run(base.replace(out=str(tmp / f"rec{i}"), proof={"mode": "record"}))
        times["rec"].append(_loop_seconds(proved) + proved.summary.get("proof_finalize_seconds", 0.0))
        work["rec"].append(_cpu(proved, coordinator_only=True) + proved.summary.get("proof_finalize_seconds", 0.0))
        cpu.append(_recording_cpu(proved))
        peaks["proof"] = max(peaks["proof"], _peak(proved.ranks))
        last["proof_dir"] = tmp / f"rec{i}" / "proof"

    kinds = [ddp, plain, rec]
    for i in range(opts.repeats):
        for kind in kinds[i % 3 :] + kinds[: i % 3]:  # ddp first, then allreduce first, then the proof first, ...
            kind(i)
    rounds = list(zip(times["ddp"], times["plain"], times["rec"]))
    return {
        **{name: min(values) for name, values in times.items()},
        "vs_ddp_median": _median([p / d for d, p, _ in rounds]),
        "overhead_median": _median([r / p - 1.0 for _, p, r in rounds]),
        "recording_cpu": _median(cpu),
        "cpu_vs_ddp_median": _median([p / d for d, p in zip(work["ddp"], work["plain"])]),
        "cpu_overhead_median": _median([r / p - 1.0 for p, r in zip(work["plain_coord"], work["rec"])]),
        "rounds": [{"ddp": d, "allreduce": p, "proof": r} for d, p, r in rounds],
        "peaks": peaks,
        **last,
    }


#: bytes per model value of one CKKS payload copy (measured: 96 at N=8192, shared and threshold keys), and the copies
#: a job holds at its peak, counted from its processes' resident memory at ResNet-18 size under threshold keys: about
#: 6 GB per worker and 9 GB and growing at the server (two workers) when the run was stopped for want of memory
_CT_BYTES_PER_VALUE, _COPIES_PER_WORKER, _SERVER_COPIES = 100, 12, 4


def _ckks_skip_reason(num_params: int, workers: int) -> str | None:
    """Why the CKKS rows cannot run here, or None: ``resources`` does not count OpenFHE's ciphertexts, and at
    ResNet-18 size they are gigabytes, so the bench checks them against the machine's budget itself."""
    from ..machine import Machine, human_bytes, memory_budget

    need = _CT_BYTES_PER_VALUE * num_params * (_COPIES_PER_WORKER * workers + _SERVER_COPIES)
    budget = memory_budget(Machine.detect())
    if need <= budget:
        return None
    return f"CKKS rows skipped: they need about {human_bytes(need)}, the memory budget now is {human_bytes(budget)}"


def _ckks_rows(base: Any, opts: argparse.Namespace) -> list[dict[str, Any]]:
    """``ps`` in plaintext (the anchor, on ``--steps``: its first step carries the server's start-up, which a CKKS
    step dwarfs but a plaintext one does not), then with CKKS under shared and threshold keys on ``--ckks-steps``."""
    from ..run import run

    ps = base.replace(pattern={"name": "ps"})
    rows = []
    for keys in ("none", "shared", "threshold"):
        cfg = ps if keys == "none" else ps.replace(crypto={"encrypt": "ckks", "keys": keys}, max_steps=opts.ckks_steps)
        done = run(cfg)
        steps, s = done.summary["steps"], done.summary
        per_worker = steps * opts.workers
        rows.append(
            {
                "keys": keys,
                "step_seconds": _loop_seconds(done) / steps,
                "bytes_per_step": s["bytes_sent"] / steps,
                "expansion": s.get("ciphertext_expansion"),
                "encrypt_seconds": s.get("he_encrypt_seconds", 0.0) / per_worker,
                "aggregate_seconds": s.get("he_aggregate_seconds", 0.0) / steps,
                "decrypt_seconds": s.get("he_decrypt_seconds", 0.0) / per_worker,
                "peak_rss_bytes": _peak(done.ranks),
            }
        )
    return rows


def _ckks_table(rows: list[dict[str, Any]], steps: int) -> list[str]:
    if not rows:  # --ckks-steps 0
        return []
    plain = rows[0]
    lines = []
    for r in rows[1:]:
        lines.append(
            f"| CKKS {r['keys']} ps step (s), {steps} steps | {r['step_seconds']:.2f} | "
            f"{r['step_seconds'] / plain['step_seconds']:.1f}x plaintext ps ({plain['step_seconds']:.3f} s; "
            "target <= 3x) |"
        )
        lines.append(
            f"| CKKS {r['keys']}: per step encrypt / aggregate / decrypt (s) | {r['encrypt_seconds']:.1f} / "
            f"{r['aggregate_seconds']:.1f} / {r['decrypt_seconds']:.1f} | encrypt, decrypt: per worker, in parallel |"
        )
        lines.append(
            f"| CKKS {r['keys']}: bytes on the wire per step (MB), expansion | {r['bytes_per_step'] / 1e6:.0f}, "
            f"{r['expansion']}x | {r['bytes_per_step'] / plain['bytes_per_step']:.1f}x plaintext ps "
            f"({plain['bytes_per_step'] / 1e6:.0f} MB) |"
        )
    return lines


def _derived_rows(num_params: int, opts: argparse.Namespace, step: float) -> list[dict[str, Any]]:
    """The CKKS phases of one step timed in this process (``_ckks_phases``), added to the plaintext step."""
    from ._ckks_phases import ckks_phases

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as a rank runs (one thread per process; OpenFHE's OpenMP threads follow OMP_NUM_THREADS)
    try:
        rows = [
            {"keys": k, **ckks_phases(num_params, k, opts.workers, opts.ckks_sample)} for k in ("shared", "threshold")
        ]
    finally:
        torch.set_num_threads(before)
    for r in rows:
        r["step_seconds"] = step + r["encrypt"] + r["aggregate"] + r["decrypt"]
    return rows


def _derived_table(rows: list[dict[str, Any]], step: float) -> list[str]:
    lines = []
    for r in rows:
        lines += [
            f"| CKKS {r['keys']} step (s), derived: plaintext step + encrypt + aggregate + decrypt, timed on "
            f"{r['sample']:.0%} of the ciphertexts | {r['step_seconds']:.1f} | {r['step_seconds'] / step:.0f}x the "
            "allreduce step (target <= 3x) |",
            f"| CKKS {r['keys']}: encrypt / aggregate / decrypt per step (s) | {r['encrypt']:.1f} / "
            f"{r['aggregate']:.1f} / {r['decrypt']:.1f} | encrypt, decrypt: per worker, in parallel |",
            f"| CKKS {r['keys']}: bytes on the wire per step (MB), expansion | {r['bytes_per_step'] / 1e6:.0f}, "
            f"{r['expansion']:.1f}x | pushes, replies{', partials' if r['keys'] == 'threshold' else ''} |",
        ]
    return lines


@BENCHMARKS.register("scale")
def run_bench(args: list[str]) -> BenchResult:
    from ..config import RunConfig
    from ..proof import VerifyOptions, verify

    opts = _parse(args)
    base = RunConfig().replace(
        workers=opts.workers,
        dataset="synthetic-cifar",
        augment="crop-flip",
        model={"name": opts.model},
        batch_size=opts.batch_size,
        max_steps=opts.steps,
        epochs=1,
        lr=0.05,
        progress=False,
        proof={"k": opts.k},
    )
    with tempfile.TemporaryDirectory(prefix="tg-bench-scale-") as tmp:
        got = _rounds(base, opts, Path(tmp))
        verdict = verify(got["proof_dir"], VerifyOptions(threads=base.threads))
        proof_bytes = sum(f.stat().st_size for f in got["proof_dir"].rglob("*") if f.is_file())
    steps = got["summary"]["steps"]
    ddp_step, step = got["ddp"] / opts.steps, got["plain"] / steps
    overhead = got["rec"] / got["plain"] - 1.0
    per_epoch = proof_bytes / steps * (2048 // (opts.workers * opts.batch_size))
    replay = _audit_replay_seconds(base)
    skipped = _ckks_skip_reason(got["summary"]["num_params"], opts.workers) if opts.ckks_steps else None
    ckks = _ckks_rows(base, opts) if opts.ckks_steps and not skipped else []
    derived = _derived_rows(got["summary"]["num_params"], opts, step) if skipped else []
    data = {
        "model": opts.model,
        "num_params": got["summary"]["num_params"],
        "workers": opts.workers,
        "steps": steps,
        "repeats": opts.repeats,
        "ddp_step_seconds": ddp_step,
        "allreduce_step_seconds": step,
        "allreduce_vs_ddp": step / ddp_step,
        "allreduce_vs_ddp_median": got["vs_ddp_median"],
        "proof_overhead": overhead,
        "proof_overhead_median": got["overhead_median"],
        "rounds": got["rounds"],
        "proof_recording_cpu": got["recording_cpu"],
        "allreduce_vs_ddp_cpu_median": got["cpu_vs_ddp_median"],
        "proof_overhead_cpu_median": got["cpu_overhead_median"],
        "proof_bytes": proof_bytes,
        "proof_bytes_per_epoch": per_epoch,
        "verify_seconds": verdict.seconds,
        "verify_vs_training": verdict.seconds / got["plain"],
        "proof_valid": verdict.valid,
        "audit_replay_seconds": replay,
        "audit_replay_vs_step": replay / step,
        "ckks": ckks,
        "ckks_skipped": skipped,
        "ckks_derived": derived,
        "peak_rss_bytes": {**got["peaks"], **{f"ckks-{r['keys']}": r["peak_rss_bytes"] for r in ckks}},
    }
    table = "\n".join(
        [
            f"scale bench: {opts.model} ({data['num_params']:,} parameters) on synthetic-cifar, crop-flip, allreduce "
            f"x{opts.workers}, batch {opts.batch_size} per worker, {steps} steps, {opts.repeats} interleaved rounds: "
            "fastest runs (median of the rounds' ratios)",
            "| measure | value | anchor |",
            "|---|---|---|",
            f"| DDP step (s) | {ddp_step:.3f} | anchor |",
            f"| allreduce step (s) | {step:.3f} | {step / ddp_step:.2f}x DDP ({got['vs_ddp_median']:.2f}x) "
            "(target <= 1.0x) |",
            f"| proof recording overhead (k={opts.k}) | {overhead:+.1%} ({got['overhead_median']:+.1%}) | training "
            "without (target <= 5%) |",
            f"| allreduce CPU (every thread of every rank), median | {got['cpu_vs_ddp_median']:.2f}x | DDP's |",
            f"| proof recording CPU (hook + writer thread), median | {got['recording_cpu']:.1%} | the coordinator's "
            "loop |",
            f"| proof recording, the coordinator's CPU (every thread) with / without - 1, median | "
            f"{got['cpu_overhead_median']:+.1%} | training without |",
            f"| proof size per epoch (MB) | {per_epoch / 1e6:.1f} | {proof_bytes / 1e6:.1f} MB for {steps} steps |",
            f"| verify (s), verdict | {verdict.seconds:.1f}, {'valid' if verdict.valid else 'INVALID'} | "
            f"{data['verify_vs_training']:.2f}x training |",
            f"| audit replay of one claim (s) | {replay:.3f} | {replay / step:.2f}x a step |",
            "| audits at rate 1 / 0.1 / 0.01 (derived) | "
            + " / ".join(f"{r * replay / step:.3f}x" for r in (1, 0.1, 0.01))
            + " | a step, per claim |",
            *_ckks_table(ckks, opts.ckks_steps),
            *([f"| {skipped}; derived instead: | | |"] if skipped else []),
            *_derived_table(derived, step),
            "| peak memory per process (MB): "
            + " / ".join(data["peak_rss_bytes"])
            + " | "
            + " / ".join(f"{v / 2**20:.0f}" for v in data["peak_rss_bytes"].values())
            + " | |",
        ]
    )
    passed = data["allreduce_vs_ddp"] <= 1.0 and overhead <= 0.05 and verdict.valid
    passed = passed and all(r["step_seconds"] <= 3 * ckks[0]["step_seconds"] for r in ckks[1:])
    passed = passed and all(r["step_seconds"] <= 3 * step for r in derived)
    return BenchResult("scale", table, data, passed)
