"""``trustgrad train``: flags (or a TOML file) -> RunConfig -> run -> a short human summary and/or one JSON line."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

from ..config import RunConfig, config_from_dict, load_toml
from ..errors import ConfigError

__all__ = ["add_parser", "config_from_args", "add_run_arguments", "render_summary", "prepare", "Prepared"]


def _csv_floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _csv_ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


# (flag, config key ("a.b" for nested), type, help). Only flags the user gives override the TOML file and defaults.
_GROUPS: list[tuple[str, list[tuple[str, str, Any, str]]]] = [
    (
        "job",
        [
            (
                "--pattern",
                "pattern.name",
                str,
                "communication pattern: allreduce, ring, ps, gossip, local-sgd, "
                "pipeline, tensor (default allreduce; unknown names are listed)",
            ),
            (
                "--workers",
                "workers",
                int,
                "processes that train (default 4): data-parallel workers; for pipeline and "
                "tensor the ranks the model is split over; ps adds its server rank(s)",
            ),
            (
                "--dataset",
                "dataset",
                str,
                "digits (default; embedded), digits32 (upsampled to 32x32), breast-cancer, "
                "synthetic, synthetic-cifar (seeded, 3x32x32), mnist, cifar10 (these two from --data-dir), or your "
                "factory package.module:name (returns (train, test), each a torch Dataset or (x, y) tensors; "
                "importable by every rank)",
            ),
            ("--data-dir", "data_dir", str, "folder with your MNIST idx files or CIFAR-10 batches (never downloaded)"),
            (
                "--augment",
                "augment",
                str,
                "none (default), crop-flip (random crop, padding 4, and horizontal flip) or flip: every decision "
                "a PRF of the seed, replayed exactly by verify and audits",
            ),
            (
                "--model",
                "model.name",
                str,
                "logreg, logreg-poly (polynomial sigmoid: what --proof blind checks), mlp (default), lenet, "
                "poly-mlp (square activation), lenet-sigmoid / lenet-relu (DLG's LeNet, 32x32 inputs), "
                "cnn-bn (small CNN with BatchNorm), resnet18 (torchvision, CIFAR stem; both for 32x32 images), or "
                "your factory package.module:name, called as factory(input_shape, num_classes) -> nn.Module "
                "(importable by every rank and the verifier: installed or on PYTHONPATH)",
            ),
            (
                "--loss",
                "model.loss",
                str,
                "training loss: the model's own (default: cross-entropy), poly-bce, or your package.module:name",
            ),
            ("--hidden", "model.hidden", int, "hidden width of mlp/lenet heads (default 64)"),
            ("--depth", "model.depth", int, "hidden layers of mlp (default 2)"),
        ],
    ),
    (
        "optimization",
        [
            ("--epochs", "epochs", int, "passes over each worker's shard (default 10)"),
            ("--max-steps", "max_steps", int, "stop after this many steps per worker (tests, attacks)"),
            ("--batch-size", "batch_size", int, "per-worker batch size (default 32)"),
            ("--optimizer", "optimizer", str, "sgd (default) or adam; proofs, audits and repairs replay it"),
            ("--lr", "lr", float, "learning rate (default 0.1)"),
            ("--momentum", "momentum", float, "SGD momentum (default 0.9; adam uses --betas)"),
            ("--betas", "betas", _csv_floats, "adam: B1,B2 (default 0.9,0.999)"),
            ("--eps", "eps", float, "adam: epsilon (default 1e-8)"),
            ("--weight-decay", "weight_decay", float, "L2 weight decay (default 0)"),
            ("--seed", "seed", int, "the run's seed: initial weights, shards and batch order derive from it"),
        ],
    ),
    (
        "engine",
        [
            ("--threads", "threads", int, "torch threads per process (default 1: more oversubscribes small machines)"),
            (
                "--server-threads",
                "server_threads",
                int,
                "threads of the server ranks, torch and OpenFHE (default: --threads); blind checks run while the "
                "workers wait, so the server can use every core",
            ),
            ("--device", "device", str, "cpu (gloo, default) or cuda (NCCL)"),
            ("--timeout", "timeout", float, "seconds any one collective or message may take before the job fails"),
        ],
    ),
    (
        "pattern options",
        [
            ("--segment-kb", "pattern.segment_kb", int, "ring: message segment size in KiB (default 1024)"),
            ("--schedule", "pattern.schedule", str, "ps: sync (default), async or ssp"),
            ("--staleness", "pattern.staleness", int, "ps --schedule ssp: the staleness bound S"),
            ("--servers", "pattern.servers", int, "ps: server ranks the parameters are sharded over (default 1)"),
            ("--straggler", "pattern.straggler", str, "ps: inject a straggler, e.g. rank=1,prob=0.1,slowdown=6"),
            ("--worker-timeout", "pattern.worker_timeout", float, "ps async/ssp: drop a worker silent this long (s)"),
            ("--checkpoint-every", "pattern.checkpoint_every", int, "ps: server checkpoint every N versions"),
            ("--topology", "pattern.topology", str, "gossip: ring, exponential or random-pairs"),
            ("--local-steps", "pattern.local_steps", int, "local-sgd: local steps H between merges"),
            ("--merge", "pattern.merge", str, "local-sgd: average or elastic"),
            ("--alpha", "pattern.alpha", float, "local-sgd --merge elastic: moving rate in (0, 1)"),
            (
                "--peer-timeout",
                "pattern.peer_timeout",
                float,
                "gossip, local-sgd: a round goes on without a late peer's message after this (s; added when it "
                "lands); a peer silent for --timeout is lost",
            ),
            (
                "--min-replicas",
                "pattern.min_replicas",
                int,
                "gossip, encrypted ring: fail the run if fewer replicas train to the end (default: a majority of "
                "--workers)",
            ),
            (
                "--stages",
                "pattern.stages",
                int,
                "pipeline: stages per pipeline (default: one per rank; --workers = stages x data-parallel replicas)",
            ),
            ("--microbatches", "pattern.microbatches", int, "pipeline: micro-batches per batch"),
            ("--pipeline-schedule", "pattern.pipeline_schedule", str, "pipeline: gpipe or 1f1b"),
            ("--split-points", "pattern.split_points", _csv_ints, "pipeline: explicit layer indices to cut at"),
        ],
    ),
    (
        "protections",
        [
            ("--encrypt", "crypto.encrypt", str, "none (default) or ckks: encrypt what workers send"),
            ("--keys", "crypto.keys", str, "ckks key mode: shared or threshold (n-of-n multiparty)"),
            (
                "--ring-ciphertexts",
                "crypto.ring_ciphertexts",
                str,
                "encrypted ring: gather (default; every member all-gathers every member's ciphertext and decrypts "
                "only the sum it computed itself) or reduce-scatter (bandwidth-optimal, but private only against "
                "honest-but-curious members: a malicious member can make the others decrypt a ciphertext of its "
                "choice)",
            ),
            ("--ring-dim", "crypto.ring_dim", int, "ckks ring dimension (default: smallest secure)"),
            ("--scale-bits", "crypto.scale_bits", int, "ckks scaling factor bits (default 40 shared, 50 threshold)"),
            (
                "--security",
                "crypto.security",
                str,
                "ckks security level: 128 (default), 192, 256, or none "
                "(INSECURE, for experiments; the summary says so)",
            ),
            (
                "--proof",
                "proof.mode",
                str,
                "Proof-of-Learning: none, record (writes OUT/proof), audit (ps: claims replayed by a data owner), "
                "blind (ps, logreg-poly, threshold CKKS: claims checked on ciphertexts at the server)",
            ),
            ("--proof-k", "proof.k", int, "steps between proof checkpoints (default 10)"),
            ("--audit-rate", "proof.audit_rate", float, "fraction of claims audited, in (0, 1]"),
            (
                "--excluded-shard",
                "proof.excluded_shard",
                str,
                "ps --proof audit: drop (default) an excluded worker's shard, or let the auditor train it in its place",
            ),
            (
                "--aggregate",
                "aggregate",
                str,
                "ps sync robust rule NAME[,key=value...]: mean (default), krum,f=F, multi-krum,f=F[,m=M], median, "
                "trimmed-mean,trim=R, bulyan,f=F, centered-clipping,tau=T[,iters=L] (docs/robustness.md)",
            ),
            ("--partition", "partition", str, "training data split: iid (default) or dirichlet (label skew)"),
            ("--dirichlet-alpha", "partition_alpha", float, "--partition dirichlet concentration (0.1: strong skew)"),
            (
                "--audit-threshold",
                "proof.audit_threshold",
                str,
                "audit rule: calibrated (default: 10x the honest replay noise measured at start, exact where replay is "
                "bit-exact), cross-thread (workers on other thread counts), or an explicit relative l2",
            ),
        ],
    ),
]


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of a training job (shared by ``train`` and the experiments that launch jobs)."""
    parser.add_argument("--config", metavar="FILE", help="TOML file of settings; flags override it")
    for title, flags in _GROUPS:
        group = parser.add_argument_group(title)
        for flag, key, kind, help_text in flags:
            metavar = flag.lstrip("-").upper().replace("-", "_")
            group.add_argument(
                flag, dest=f"cfg:{key}", type=kind, default=argparse.SUPPRESS, metavar=metavar, help=help_text
            )
    group = parser.add_argument_group("attacks and records")
    group.add_argument(
        "--malicious",
        dest="cfg:malicious",
        action="append",
        default=argparse.SUPPRESS,
        metavar="SPEC",
        help="make a worker malicious: rank=R,attack=A[,from-step=N] (repeatable)",
    )
    group.add_argument(
        "--record-server-view",
        dest="cfg:record_server_view",
        action="store_true",
        default=argparse.SUPPRESS,
        help="store what the server receives, for `trustgrad attack`",
    )
    group.add_argument(
        "--out",
        dest="cfg:out",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="write summary.json, metrics.jsonl, config.json and model.safetensors here",
    )
    group.add_argument(
        "--tensorboard",
        dest="cfg:tensorboard",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="also write per-epoch metrics and the protections' statistics as TensorBoard scalars here",
    )
    group.add_argument(
        "--resume",
        dest="cfg:resume",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="continue a run from its checkpoint folder",
    )
    group.add_argument(
        "--no-progress", dest="cfg:progress", action="store_false", default=argparse.SUPPRESS, help="no progress bar"
    )
    parser.add_argument(
        "--oversubscribe",
        action="store_true",
        help="start more processes than the machine's cap (4 per core, at least 8); see docs/limits.md",
    )


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """TOML file (if any), then the flags given, validated into a ``RunConfig``."""
    data: dict[str, Any] = load_toml(args.config) if getattr(args, "config", None) else {}
    for dest, value in vars(args).items():
        if not dest.startswith("cfg:"):
            continue
        *parents, leaf = dest[4:].split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {part!r} must be a table")
        node[leaf] = tuple(value) if isinstance(value, list) else value
    return config_from_dict(data)


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="train a model across processes",
        description="Train a model with N local worker processes (or as one rank under torchrun). "
        "Example: trustgrad train --pattern ring --workers 4 --dataset digits --model mlp --epochs 10 --json",
    )
    add_run_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    parser.set_defaults(func=_main)


@dataclass(frozen=True)
class Prepared:
    """A job that passed every check before launch: its config and the memory estimate it was held to."""

    cfg: RunConfig
    oversubscribe: bool
    estimate: object  # trustgrad.resources.JobEstimate (imported on use: it pulls in torch)


def prepare_args(args: argparse.Namespace, machine: object = None) -> Prepared:
    """Everything ``trustgrad train`` does before it starts a process: the TOML file and flags into a validated
    config, the pattern's own checks, then what the job asks of the machine (``trustgrad.resources``)."""
    from ..factories import allow
    from ..patterns import PATTERNS
    from ..resources import check_launch

    cfg = config_from_args(args)
    allow(cfg.model.name, cfg.model.loss, cfg.dataset)  # factories this user named on the command line or in TOML
    oversubscribe = bool(getattr(args, "oversubscribe", False))
    # resources first: a pattern's checks may build the model (ps --resume), which must fit the budget
    estimate = check_launch(cfg, machine, oversubscribe)  # type: ignore[arg-type]
    PATTERNS.get(cfg.pattern.name).check(cfg)
    return Prepared(cfg, oversubscribe, estimate)


def prepare(argv: list[str], machine: object = None) -> Prepared:
    """``trustgrad train ARGV`` up to, not including, the launch: a ``ConfigError`` (one line) for anything the
    user must fix. Nothing is started and nothing is written (the fuzz target drives this)."""
    from . import build_parser

    args = build_parser().parse_args(["train", *argv])
    return prepare_args(args, machine)


def _main(args: argparse.Namespace) -> int:
    from ..api import run_job
    from ..resources import oversubscription

    prepared = prepare_args(args)
    with oversubscription(prepared.oversubscribe):
        result = run_job(prepared.cfg)  # the API's own entry point: the CLI only parses and renders
    if not result.summary:  # a non-coordinating torchrun rank
        return 0
    if not args.json:
        print(render_summary(result.summary))
    else:
        print(json.dumps(result.summary), flush=True)
    sys.stdout.flush()
    return 0


def render_summary(s: dict[str, Any]) -> str:
    lines = [
        f"trustgrad: {s['pattern']} ({s['schedule']}) with {s['workers']} workers on {s['dataset']}/{s['model']}",
        f"  {s['steps']} steps in {s['wall_seconds']:.1f} s; final loss {s['final_loss']:.4f}, "
        f"test accuracy {s['test_accuracy']:.4f}",
        f"  bytes sent: {s['bytes_sent'] / 1e6:.2f} MB in total",
        f"  encryption: {s['encryption']}",
        f"  proof: {s['proof']}",
    ]
    if s.get("dropped_ranks"):
        lines.append(f"  dropped ranks: {s['dropped_ranks']}")
    if s.get("stand_in_gradients"):
        lines.append(f"  the auditor trained the excluded shards in their place: {s['stand_in_gradients']} gradients")
    if "replicas_final" in s:  # patterns that survive losses say who trained to the end
        lost = ", ".join(
            f"{'rank' if 'rank' in e else 'worker'} {e.get('rank', e.get('worker'))}"
            + (f" at step {e['step']}" if e.get("step") is not None else "")
            for e in s.get("replicas_lost", [])
        )
        lines.append(
            f"  replicas: {s['replicas_final']} of {s['replicas_started']} trained to the end"
            + (f" (lost: {lost})" if lost else "")
        )
    return "\n".join(lines)
