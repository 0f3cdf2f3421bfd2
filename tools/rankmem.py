"""Peak memory of every rank of a ``trustgrad train`` job, and the set-up seconds its summary reports.

Usage (from the repository root; the blind job is several GB per rank: run it under the machine's heavy-job lock)::

    flock /work/.heavy.lock .venv/bin/python tools/rankmem.py --demo-blind [--max-steps 2] [--epochs 2]
    flock /work/.heavy.lock .venv/bin/python tools/rankmem.py -- --pattern ps --workers 4 --encrypt ckks \
        --keys threshold --epochs 2

``--demo-blind`` is the blind run of ``trustgrad demo`` (trustgrad/cli/demo.py: logreg-poly on digits, 4 workers,
lr 0.3, no momentum, threshold CKKS, ``--proof blind``, worker 1 sign-flipping, the server's threads from
``check_threads``); anything after ``--`` goes to ``trustgrad train`` as it is.

Why sampling /proc: the ranks are forked by multiprocessing's fork server, so ``getrusage(RUSAGE_CHILDREN)`` of the
launcher would give one maximum over all of them, and the isolated parsers (crypto/sandbox.py) are children of the
ranks. Every ``--interval`` seconds this reads VmHWM (the kernel's peak resident set, monotone) and VmRSS of every
descendant of the launcher; a process's last VmHWM read is its peak up to at most one interval before it exited.
Ranks are told apart by start order: the launcher starts rank 0, 1, ... one after the other (launch.spawn), so
among the fork server's children the lowest pid is rank 0. A parser helper is reported under the rank that started
it. ``set-up s`` is the summary's ``setup_seconds`` (the blind server's codec: keys, evaluation keys and every
worker's encrypted samples, protect/codecs/blind.py); other jobs report their crypto ``keygen`` seconds if any.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def demo_blind_args(epochs: int) -> list[str]:
    from trustgrad.protect.codecs.blind import check_threads

    return [
        "--pattern", "ps", "--workers", "4", "--dataset", "digits", "--model", "logreg-poly",
        "--epochs", str(epochs), "--lr", "0.3", "--momentum", "0", "--encrypt", "ckks", "--keys", "threshold",
        "--proof", "blind", "--audit-rate", "1", "--malicious", "rank=2,attack=sign-flip",
        "--server-threads", str(check_threads()), "--no-progress",
    ]  # fmt: skip


def _status(pid: int) -> dict[str, int] | None:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS", "PPid"):
                    out[key] = int(value.split()[0])
    except (OSError, ValueError):
        return None
    return out if "VmHWM" in out else None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _status(int(entry))
            if st is not None:
                kids.setdefault(st["PPid"], []).append(int(entry))
    return kids


def measure(train_args: list[str], interval: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "trustgrad", "train", *train_args, "--json"]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, dict] = {}  # pid -> {"hwm", "rss", "parent", "cmd"}
    while proc.poll() is None:
        kids = _children()
        stack, seen = [proc.pid], [(proc.pid, os.getpid())]
        while stack:
            pid = stack.pop()
            for child in kids.get(pid, []):
                seen.append((child, pid))
                stack.append(child)
        for pid, parent in seen:
            st = _status(pid)
            if st is None:
                continue
            rec = peaks.setdefault(pid, {"hwm": 0, "rss": 0, "parent": parent, "cmd": ""})
            rec["cmd"] = _cmdline(pid) or rec["cmd"]  # every time: one seen between fork and exec has its parent's
            rec["hwm"], rec["rss"] = max(rec["hwm"], st["VmHWM"]), max(rec["rss"], st["VmRSS"])
        time.sleep(interval)
    stdout, stderr = proc.communicate()
    wall = time.monotonic() - started
    if proc.returncode != 0:
        sys.stderr.write(stderr[-4000:])
        raise SystemExit(f"rankmem: the job failed (exit {proc.returncode})")
    summary = json.loads(stdout.strip().splitlines()[-1])
    # the fork server: the launcher's child whose own children are the ranks (those started by a fork server)
    server = [p for p, r in peaks.items() if r["parent"] == proc.pid and "forkserver" in r["cmd"]]
    ranks = sorted(p for p, r in peaks.items() if server and r["parent"] == server[0])
    rows = {}
    for i, pid in enumerate(ranks):
        helpers = [r["hwm"] for p, r in peaks.items() if r["parent"] == pid and "sandbox_helper" in r["cmd"]]
        rows[f"rank {i}"] = {"peak_mb": peaks[pid]["hwm"] / 1024, "max_rss_mb": peaks[pid]["rss"] / 1024,
                             "helper_peak_mb": max(helpers) / 1024 if helpers else None}  # fmt: skip
    setup = summary.get("setup_seconds")
    return {
        "args": train_args,
        "wall_seconds": round(wall, 1),
        "setup_seconds": setup,
        "keygen_seconds": summary.get("he_keygen_seconds"),
        "rekey_seconds": summary.get("rekey_seconds"),
        "bytes_sent": summary.get("bytes_sent"),
        "test_accuracy": summary.get("test_accuracy"),
        "load_before": os.getloadavg()[0],
        "ranks": rows,
        "launcher_peak_mb": peaks[proc.pid]["hwm"] / 1024 if proc.pid in peaks else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-blind", action="store_true", help="the blind run of `trustgrad demo`")
    parser.add_argument("--epochs", type=int, default=2, help="--demo-blind: epochs (the demo's default: 2)")
    parser.add_argument("--max-steps", type=int, default=0, help="--demo-blind: stop after this many steps")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between /proc samples")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("train", nargs="*", help="after --: arguments of `trustgrad train`")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    train = demo_blind_args(args.epochs) if args.demo_blind else list(args.train)
    if args.demo_blind and args.max_steps:
        train += ["--max-steps", str(args.max_steps)]
    load = os.getloadavg()[0]
    result = measure(train, args.interval)
    result["load_before"] = round(load, 2)
    result["load_after"] = round(os.getloadavg()[0], 2)
    if args.json:
        print(json.dumps(result))
        return 0
    print("trustgrad train " + " ".join(train))
    print(f"wall {result['wall_seconds']} s, set-up {result['setup_seconds']} s (re-key {result['rekey_seconds']} s, "
          f"server keygen {result['keygen_seconds']} s), load {load:.1f} -> "
          f"{result['load_after']}, accuracy {result['test_accuracy']}, bytes {result['bytes_sent']}")  # fmt: skip
    for name, row in result["ranks"].items():
        helper = f", parser helper {row['helper_peak_mb']:.0f} MB" if row["helper_peak_mb"] else ""
        print(f"  {name}: peak {row['peak_mb']:.0f} MB (VmHWM){helper}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
