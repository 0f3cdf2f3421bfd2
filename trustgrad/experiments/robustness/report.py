"""Markdown tables and a heat map of the robustness experiment's cells."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

__all__ = ["table", "plot", "claims"]

HONEST_ONLY = "honest-only"  # the anchor row (experiment.HONEST_ONLY; not imported, so old results.json still render)
AUDITS = ("audit-1", "audit-0.1", "audit-1-stand-in")


def _acc(c: dict[str, Any]) -> str:
    return f"{c['accuracy_mean']:.3f} ({-c['drop_points']:+.1f})" if c["drop_points"] is not None else "-"


def table(data: dict[str, Any]) -> str:
    s, cells = data["settings"], data["cells"]
    defences = list(dict.fromkeys(c["defence"] for c in cells))
    lines = [
        f"digits/mlp, ps sync, {s['workers']} workers of which the last {s['malicious']} are malicious and collude; "
        f"{s['epochs']} epochs, batch {s['batch_size']} per worker; seeds {data['seeds']}; Dirichlet alpha "
        f"{s['dirichlet_alpha']}. Test accuracy, mean over seeds (points against the all-honest plain mean of all "
        f"{s['workers']} workers, same partition and seed). Row `{HONEST_ONLY}`: the {s['workers'] - s['malicious']} "
        f"honest workers alone on the same shards (the last {s['malicious']} never push), plain mean. Wall time "
        f"{data['wall_seconds']:.0f} s.",
    ]
    for partition in dict.fromkeys(c["partition"] for c in cells):
        lines += [
            "",
            f"**{partition}**",
            "",
            "| attack | " + " | ".join(defences) + " |",
            "|---" * (len(defences) + 1) + "|",
        ]
        for attack in dict.fromkeys(c["attack"] for c in cells if c["partition"] == partition):
            row = {c["defence"]: c for c in cells if c["partition"] == partition and c["attack"] == attack}
            lines.append(f"| {attack} | " + " | ".join(_acc(row[d]) if d in row else "-" for d in defences) + " |")
    lines += [
        "",
        "| partition | attack | defence | accuracy per seed | points vs honest-only | backdoor success | attackers "
        "excluded per seed (first step) | false exclusions | colluders' vectors kept whole per round (Krum: 1 = every "
        "round) | defence time per step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        if c["attack"] == "none" and not c["false_exclusions"] and c["defence"] not in AUDITS:
            continue
        bd = "-" if c["backdoor_success"] is None else f"{sum(c['backdoor_success']) / len(c['backdoor_success']):.3f}"
        caught = ", ".join(
            f"{len(a)} ({s})" if a else "0" for a, s in zip(c["attackers_excluded"], c["first_exclusion_step"])
        )
        share = "-" if _per_round(c, data) is None else f"{_per_round(c, data):.2f}"
        per_seed = ", ".join(f"{a:.3f}" for a in c["accuracy"])
        vs = "-" if c.get("drop_vs_honest_only_points") is None else f"{-c['drop_vs_honest_only_points']:+.1f}"
        lines.append(
            f"| {c['partition']} | {c['attack']} | {c['defence']} | {per_seed} | {vs} | {bd} | {caught} "
            f"| {c['false_exclusions']} | {share} | {c['defence_seconds_per_step'] * 1e3:.2f} ms |"
        )
    return "\n".join([*lines, "", claims(data)])


def _per_round(c: dict[str, Any], data: dict[str, Any]) -> float | None:
    if "colluders_admitted_per_round" in c:
        return c["colluders_admitted_per_round"]
    old = c.get("attacker_selected_share")  # results written before the per-round count: a share of f x rounds
    return None if old is None else old * data["settings"]["malicious"]


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = data["cells"]
    partitions = list(dict.fromkeys(c["partition"] for c in cells))
    defences = list(dict.fromkeys(c["defence"] for c in cells))
    fig, axes = plt.subplots(1, len(partitions), figsize=(6 * len(partitions), 4.5), squeeze=False)
    for ax, partition in zip(axes[0], partitions):
        attacks = list(dict.fromkeys(c["attack"] for c in cells if c["partition"] == partition))
        grid = np.full((len(attacks), len(defences)), np.nan)
        for c in cells:
            if c["partition"] == partition:
                grid[attacks.index(c["attack"]), defences.index(c["defence"])] = c["accuracy_mean"]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(defences)), defences, rotation=45, ha="right")
        ax.set_yticks(range(len(attacks)), attacks)
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
        ax.set_title(f"test accuracy, {partition}")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _held(share: list[float], full: dict[str, Any], alone: dict[str, Any], i: int) -> str:
    """The classes the excluded workers take with them (their shards hold at least half of the class), each with its
    test accuracy in seed ``i``: all-honest -> the honest workers alone."""
    held = []
    for k, v in enumerate(share):
        if v < 0.5:
            continue
        acc = (full.get("class_accuracy") or [[]])[i], (alone.get("class_accuracy") or [[]])[i]
        known = all(len(a) > k and a[k] is not None for a in acc)
        held.append(f"class {k} {100 * v:.0f}%" + (f" (accuracy {acc[0][k]:.2f} -> {acc[1][k]:.2f})" if known else ""))
    return ", ".join(held) or "none"


def claims(data: dict[str, Any]) -> str:
    """The issue's acceptance claims, each read off the measured cells (with the seeds it rests on)."""
    cells = {(c["partition"], c["attack"], c["defence"]): c for c in data["cells"]}
    honest = {p: cells[(p, "none", "mean")]["accuracy"] for p in ("iid", "dirichlet") if (p, "none", "mean") in cells}
    lines = [f"Seeds {data['seeds']}; drops in points against the all-honest plain mean of the same seed, per seed."]

    def drops(key: tuple[str, str, str]) -> str:
        c = cells.get(key)
        if c is None or key[0] not in honest:
            return "not run"
        d = ", ".join(f"{100 * (h - a):+.1f}" for h, a in zip(honest[key[0]], c["accuracy"]))
        share = _per_round(c, data)
        whole = "" if share is None else f"; colluders' vectors kept whole per round {share:.2f}"
        return f"{c['accuracy_mean']:.3f} (drops {d}{whole}; {1e3 * c['defence_seconds_per_step']:.1f} ms/step)"

    for attack in ("alie", "ipm"):
        for rule in ("krum", "median"):
            lines.append(f"- {attack} vs {rule} (iid): {drops(('iid', attack, rule))}")
    only = {p: cells[(p, HONEST_ONLY, "mean")]["accuracy"] for p in honest if (p, HONEST_ONLY, "mean") in cells}
    seeds = data["seeds"]
    for partition, ref in only.items():
        d = ", ".join(f"{100 * (h - a):+.1f}" for h, a in zip(honest[partition], ref))
        shares = data.get("attackers_class_share", {}).get(partition, [])
        full, alone = cells[(partition, "none", "mean")], cells[(partition, HONEST_ONLY, "mean")]
        per_seed = [f"seed {seed}: {_held(v, full, alone, i)}" for i, (seed, v) in enumerate(zip(seeds, shares))]
        lines.append(
            f"- {HONEST_ONLY} ({partition}): the honest workers alone {statistics.mean(ref):.3f} (drops {d} from the "
            f"all-honest run); classes of which the attackers' shards hold at least half: "
            f"{'; '.join(per_seed) or '-'}"
        )
    for partition, defence in ((p, d) for p in honest for d in ("audit-1", "audit-1-stand-in")):
        audited = [c for (p, a, d), c in cells.items() if p == partition and a not in ("none", HONEST_ONLY) and
                   d == defence]  # fmt: skip
        if audited:
            first = all(c["caught_at_first_push"] for c in audited)
            false = sum(c["false_exclusions"] for c in cells.values() if c["partition"] == partition and
                        c["defence"] == defence)  # fmt: skip
            gaps = [100 * abs(h - a) for c in audited for h, a in zip(honest[partition], c["accuracy"])]
            text = (
                f"- {defence} ({partition}): {len(audited)} attacks, every attacker excluded at its first "
                f"poisoned push: {first}; false exclusions {false}; largest gap to the all-honest run "
                f"{max(gaps):.1f} points"
            )
            if partition in only:
                to_only = [100 * abs(h - a) for c in audited for h, a in zip(only[partition], c["accuracy"])]
                text += f", to the honest workers alone {max(to_only):.1f} points"
            lines.append(text)
    if "dirichlet" in honest:
        rules = ("krum", "multi-krum", "median", "trimmed-mean", "bulyan", "centered-clipping", "cc-tau2")
        for d in (*rules, "cc-momentum", *AUDITS):
            lines.append(f"- no attacker, Dirichlet {data['settings']['dirichlet_alpha']}, {d}: "
                         f"{drops(('dirichlet', 'none', d))}")  # fmt: skip
    return "\n".join(lines)
