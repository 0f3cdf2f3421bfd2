"""Tables, plots and the answer to the paper's question, all computed from the measured data (nothing typed in)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["answer", "markdown", "plots"]


def _pct(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"


def _g(x: Any, fmt: str = ".2g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return "inf" if isinstance(x, float) and math.isinf(x) else format(x, fmt)


def answer(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    lines = []
    if "acceptance" in data:
        acc = data["acceptance"]
        default = f"{acc['default_threshold']:g}"
        per_mode: dict[str, Any] = {}
        for cell in acc["cells"]:
            if cell["scale_bits"] is None:
                continue
            ok = cell["claims"]["acceptance"][default] == 1.0 and cell["aggregates"]["acceptance"][default] == 1.0
            entry = per_mode.setdefault(cell["mode"], {"min_scale_all_accepted": None, "max_rel_l2_at": {}})
            at = entry["max_rel_l2_at"]
            at[cell["scale_bits"]] = max(cell["claims"]["rel_l2_max"], cell["aggregates"]["rel_l2_max"])
            if ok and (entry["min_scale_all_accepted"] is None or cell["scale_bits"] < entry["min_scale_all_accepted"]):
                entry["min_scale_all_accepted"] = cell["scale_bits"]
        out.update(default_threshold=acc["default_threshold"], per_mode=per_mode)
        for mode, e in per_mode.items():
            sc, at = e["min_scale_all_accepted"], e["max_rel_l2_at"]
            preset = 40 if mode == "shared" else 50
            worst = f"; worst honest rel_l2 at 2^{preset}: {_g(at.get(preset))}" if preset in at else ""
            lines.append(
                f"{mode}: every honest claim and aggregate accepted at the reference threshold 3e-4 "
                f"from 2^{sc} up{worst}"
                if sc is not None
                else f"{mode}: no measured scale had every honest claim accepted at the reference threshold 3e-4"
            )
    if "detection" in data:
        det = data["detection"]
        audited = [v["summary"] for k, v in det["honest"].items() if "audit" in k]
        attacked = [r["min_rejected_rel_l2"] for r in det["rows"] if not math.isnan(r["min_rejected_rel_l2"])]
        out.update(
            honest_runs=sum(h["runs"] for h in audited),
            honest_false_rejections=sum(h["false_rejections"] for h in audited),
            honest_audited_claims=sum(h["audited_claims"] for h in audited),
            smallest_rejected_malicious_rel_l2=min(attacked) if attacked else math.nan,
            detected=sum(r["detected"] for r in det["rows"]),
            attacked_runs=sum(r["runs"] - r["errors"] for r in det["rows"]),
        )
        lines.append(
            f"plaintext audits: malicious worker excluded in {out['detected']}/{out['attacked_runs']} attacked runs; "
            f"{out['honest_false_rejections']} false rejections in {out['honest_audited_claims']} audited honest "
            f"claims over {out['honest_runs']} runs; smallest rel_l2 of a rejected malicious claim "
            f"{_g(out['smallest_rejected_malicious_rel_l2'])}"
        )
    if "blind" in data:
        b = data["blind"]
        detected = sum(r["detected"] for r in b["rows"])
        runs = sum(r["runs"] - r["errors"] for r in b["rows"])
        false = sum(r["false_exclusions"] for r in b["rows"]) + b["honest"]["false_rejections"]
        honest_claims = sum(r["honest_claims_checked"] for r in b["rows"]) + b["honest"]["claims"]
        worst = max(d for d in [b["honest"]["worst_distance"], *(r["worst_honest_distance"] for r in b["rows"])]
                    if not math.isnan(d)) if b["rows"] or b["honest"]["runs"] else math.nan  # fmt: skip
        out.update(blind_detected=detected, blind_runs=runs, blind_false=false, blind_honest_claims=honest_claims)
        lines.append(
            f"blind verification (threshold CKKS, ciphertexts only at the server): malicious worker excluded in "
            f"{detected}/{runs} attacked runs; {false} honest claims rejected of {honest_claims} checked; worst honest "
            f"distance {_g(worst)} against the bound {_g(b['rows'][0]['bound'] if b['rows'] else b['honest']['bound'])}"
        )
        blind_owner = [r for r in b.get("owner_poison", []) if r["check"].startswith("blind") and "error" not in r]
        if blind_owner:
            passed = sum(not r["caught"] for r in blind_owner)
            lines.append(
                f"owner-poisoned data passed the blind checks in {passed}/{len(blind_owner)} runs (blind checks "
                "cannot see data poisoned by its owner before encryption; a verifier holding the true data can)"
            )
    out["text"] = "; ".join(lines) + "."
    return out


def markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    out = [
        "# pol-he: does CKKS noise make the verifier reject honest proofs?",
        "",
        f"Machine: {m['cpus']} CPUs, load average {m['load_average_at_start']} at start; seeds "
        f"{data['settings']['seeds']}; part seconds {data['seconds']}.",
        "",
        f"**Answer.** {data['answer']['text']}",
    ]
    if "acceptance" in data:
        out += ["", *_acceptance_table(data["acceptance"])]
    if "detection" in data:
        out += ["", *_detection_table(data["detection"])]
    if "cost" in data:
        out += ["", *_cost_table(data["cost"])]
    if "leakage" in data:
        out += ["", *_leak_table(data["leakage"])]
    if "blind" in data:
        out += ["", *_blind_table(data["blind"])]
    out += ["", "Plots: " + (", ".join(data.get("pngs", [])) or "none")]
    return "\n".join(out)


def _acceptance_table(acc: dict[str, Any]) -> list[str]:
    th = [f"{t:g}" for t in acc["thresholds"]]
    out = [
        f"## 1. Honest acceptance vs CKKS scale and threshold (digits/mlp, {acc['workers']} workers, "
        f"{acc['steps_per_seed']} rounds per seed; 128-bit parameters; each cell: claims / aggregates accepted)",
        "",
        "| keys | scale | N | claims | " + " | ".join(f"t={t}" for t in th) + " | rel_l2 median / p95 / max (claims) "
        "| max (aggregates) | decrypt failures |",
        "|---|---|---:|---:|" + "---:|" * len(th) + "---:|---:|---:|",
    ]
    for c in acc["cells"]:
        cl, ag = c["claims"], c["aggregates"]
        sc = "-" if c["scale_bits"] is None else f"2^{c['scale_bits']}"
        n = acc["ring_dim"].get(f"{c['mode']}@{c['scale_bits']}", "-")
        cells = " | ".join(f"{_pct(cl['acceptance'][t])} / {_pct(ag['acceptance'][t])}" for t in th)
        fails = cl["decryption_failures"] + ag["decryption_failures"]
        out.append(
            f"| {c['mode']} | {sc} | {n} | {cl['n']} | {cells} | {_g(cl['rel_l2_median'])} / {_g(cl['rel_l2_p95'])} "
            f"/ {_g(cl['rel_l2_max'])} | {_g(ag['rel_l2_max'])} | {fails} |"
        )
    out += [
        "",
        f"Reference threshold {acc['default_threshold']:g} (relative l2; the fixed rule before calibration, see "
        "docs/audits.md: a calibrated encrypted audit uses 10x the measured CKKS floor) plus the cosine rule "
        f"(<= {acc['cos_rule']:g}). Claims: one worker's ciphertext decrypted, times W, replayed by "
        "`Auditor.check`; aggregates: the server's sum of W ciphertexts (each pre-scaled by 1/W) decrypted to float32.",
    ]
    return out


def _detection_table(det: dict[str, Any]) -> list[str]:
    out = [
        f"## 2. Detection per attack vs audit rate (ps, {det['workers']} workers, {det['steps']} steps, worker 1 "
        f"malicious from step {det['from_step']})",
        "",
        "| schedule | attack | audit rate | detected | steps to detection | caught late | rounds repaired "
        "| honest excluded | accuracy (audited) | max gap to rate 1, same seed | accuracy (unverified) "
        "| honest accuracy | max gap to same-seed honest | smallest rejected rel_l2 | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in det["rows"]:
        out.append(
            f"| {r['schedule']} | {r['attack']} | {r['audit_rate']:g} | {r['detected']}/{r['runs'] - r['errors']} | "
            f"{_g(r['steps_to_detection_mean'], '.1f')} | {r.get('caught_late', '-')} "
            f"| {_g(r['rolled_back_mean'], '.1f')} "
            f"| {r['false_exclusions']} | {_g(r['accuracy_mean'], '.3f')} | {_g(r.get('gap_to_rate_1_max'), '.3f')} "
            f"| {_g(r['unverified_accuracy'], '.3f')} "
            f"| {_g(r['honest_accuracy'], '.3f')} | {_g(r.get('accuracy_gap_max'), '.3f')} "
            f"| {_g(r['min_rejected_rel_l2'])} | {r['errors']} |"
        )
    out += [
        "",
        "Honest runs (no malicious worker):",
        "",
        "| runs | seeds | audited claims | false rejections | honest excluded | worst accepted rel_l2 | accuracy "
        "| errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, v in det["honest"].items():
        h = v["summary"]
        out.append(
            f"| {k} | {h['runs']} | {h['audited_claims']} | {h['false_rejections']} | {h['excluded']} | "
            f"{_g(h['worst_accepted_rel_l2'])} | {_g(h['accuracy_mean'], '.3f')} | {h['errors']} |"
        )
    return out


def _cost_table(cost: dict[str, Any]) -> list[str]:
    d, per_epoch, w = cost["direct"], cost["steps_per_epoch"], cost["workers"]
    plain = cost["jobs"]["plaintext"]
    base = plain["train_seconds"] / plain["steps"] if "error" not in plain else math.nan
    lines = [
        f"## 3. Cost per verified step (seconds; per epoch = {w} workers x {per_epoch} steps)",
        "",
        "| what | seconds per step | x plaintext | per epoch |",
        "|---|---:|---:|---:|",
        f"| plaintext worker gradient (direct) | {_g(d['plaintext_step'], '.2e')} | 1 | "
        f"{_g(d['plaintext_step'] * w * per_epoch, '.3f')} |",
        f"| audit replay of one claim (`Auditor.check`, direct) | {_g(d['audit_check'], '.2e')} | "
        f"{_g(d['audit_check'] / d['plaintext_step'], '.1f')} | {_g(d['audit_check'] * w * per_epoch, '.3f')} "
        "(rate 1) |",
        f"| CKKS encrypt one gradient (direct, all scales) | {_g(d['encrypt'], '.2e')} | "
        f"{_g(d['encrypt'] / d['plaintext_step'], '.1f')} | |",
        f"| CKKS decrypt one vector (direct, all modes) | {_g(d['decrypt'], '.2e')} | "
        f"{_g(d['decrypt'] / d['plaintext_step'], '.1f')} | |",
    ]
    for k, v in cost["audit_jobs"].items():
        lines.append(
            f"| ps job, {k}: server loop per version (mean of {v['runs']}) | {_g(v['server_seconds_per_step'], '.3f')} "
            f"| | {_g(v['server_seconds_per_step'] * per_epoch, '.2f')} |"
        )
    for k, v in cost["jobs"].items():
        if "error" in v:
            lines.append(f"| ps job, {k} | error: {v['error']} | | |")
            continue
        sec = v["train_seconds"] / v["steps"]
        he = ", ".join(f"{x[3:-8]} {v[x]:.2f}" for x in sorted(v) if x.startswith("he_") and x.endswith("_seconds"))
        extra = f" (CKKS s summed over ranks: {he}; ciphertext x{v.get('ciphertext_expansion')})" if he else ""
        lines.append(
            f"| ps job, {k}: server loop per version, same seed, back to back{extra} | {sec:.3f} | "
            f"{_g(sec / base, '.1f')} | {sec * per_epoch:.2f} |"
        )
    for r in cost["blind"]["rows"]:
        lines.append(
            f"| blind step check, {r['kind']} (depth {r['depth']}, N={r['ring_dim']}; batch {cost['blind']['batch']}; "
            f"vs numpy recomputation {r['plaintext_s']:.1e} s; honest err {r['honest_error_max']:.1e}, 1e-4 tamper "
            f"{r['tamper_1e-4_min']:.1e}) | {r['check_s']:.2f} | {r['check_s'] / r['plaintext_s']:,.0f} | "
            f"{r['check_s'] * w * per_epoch:.1f} |"
        )
    return lines


def _leak_table(leak: dict[str, Any]) -> list[str]:
    lines = [
        f"## 4. What the server's view leaks (iDLG, {leak['idlg_steps']} L-BFGS steps, batch 1, ps with 2 workers; "
        "sigmoid LeNet on digits 32x32, and for the logreg-poly rows the model blind verification checks, on 8x8 "
        "digits)",
        "",
        "| mode | the server holds | PSNR dB (mean) | label accuracy | runs | errors |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for mode, v in leak["summary"].items():
        lines.append(
            f"| {mode} | {v['view_kind']} | {_g(v['psnr_mean'], '.1f')} | {_g(v['label_accuracy_mean'], '.2f')} | "
            f"{v['runs']} | {v['errors']} |"
        )
    return lines


def _blind_table(b: dict[str, Any]) -> list[str]:
    h, c = b["honest"], b["cost"]
    out = [
        "## 5. Blind verification inside training (ps --encrypt ckks --keys threshold --proof blind; "
        f"digits/logreg-poly, {b['workers']} workers, batch 32, lr {b['lr']:g}, no momentum; worker 1 malicious "
        f"from step 0; {b['steps']} rounds per detection run)",
        "",
        "| attack | detected | at step (max) | honest excluded | smallest distance of a caught claim | bound "
        "| worst honest distance | honest claims checked | re-key s | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in b["rows"]:
        out.append(
            f"| {r['attack']} | {r['detected']}/{r['runs'] - r['errors']} | {_g(r['detection_step_max'])} | "
            f"{r['false_exclusions']} | {_g(r['min_distance'], '.3g')} | {_g(r['bound'])} | "
            f"{_g(r['worst_honest_distance'])} | {r['honest_claims_checked']} | {_g(r['rekey_seconds'], '.1f')} | "
            f"{r['errors']} |"
        )
    out += [
        "",
        f"Honest blind runs: {h['runs']} seeds, {h['claims']} claims checked, {h['false_rejections']} rejected, "
        f"{h['excluded']} workers excluded, worst honest distance {_g(h['worst_distance'])} (bound {_g(h['bound'])}), "
        f"{h['errors']} errors.",
    ]
    if b["accuracy"]:
        out += [
            "",
            "| seed | epochs | blind, all honest | blind, sign-flip caught | unverified plaintext, sign-flip "
            "| plaintext, all honest | caught | gap, points |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        gaps = []
        for r in b["accuracy"]:
            gap = None if r["caught"] is None or r["plain"] is None else 100 * (r["plain"] - r["caught"])
            if gap is not None:
                gaps.append(gap)
            out.append(
                f"| {r['seed']} | {r['epochs']} | {_g(r['honest'], '.3f')} | {_g(r['caught'], '.3f')} | "
                f"{_g(r['unverified'], '.3f')} | {_g(r['plain'], '.3f')} | {r['caught_detected']} | "
                f"{_g(gap, '+.1f')} |"
            )
        out += [
            "",
            "Gap: the all-honest run's accuracy minus the caught run's (the honest blind run, first seed only, "
            "ends where the plaintext one does). "
            f"Within 1 point in {sum(abs(g) <= 1 for g in gaps)}/{len(gaps)} seeds; mean "
            f"{_g(float(np.mean(gaps)) if gaps else None, '+.2f')}.",
        ]
    if b.get("owner_poison"):
        out += ["", *_owner_poison_table(b["owner_poison"])]
    out += [
        "",
        f"Cost (honest blind runs; seconds): set-up {_g(c['setup_seconds'], '.1f')} (keys, evaluation keys, every "
        f"worker's samples encrypted once), check {_g(c['check_seconds_per_claim'], '.2f')} per claim, verdict "
        f"decryption {_g(c['verdict_seconds_per_claim'], '.3f')} per claim; a round takes "
        f"{_g(c['server_seconds_per_round'], '.2f')} s against {_g(c['plaintext_seconds_per_round'], '.4f')} s for "
        f"plaintext ps ({_g(c['server_seconds_per_round'] / c['plaintext_seconds_per_round'], '.0f')}x); "
        f"{_g(c['bytes_per_run'] / 1e6, '.0f')} MB on the wire per run. The server held: {c['server_key_material']}.",
    ]
    return out


def _owner_poison_table(rows: list[dict[str, Any]]) -> list[str]:
    steps = rows[0]["steps"]
    out = [
        f"### Owner-poisoned data (worker 1 shifts its own labels y -> y+1 before training and before encrypting its "
        f"samples; {steps} rounds)",
        "",
        "| seed | check | true data held by | caught | at step | claims checked (accepted) | honest excluded "
        "| accuracy | all-honest accuracy |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['seed']} | {r['check']} | {r['true_data_held_by']} | error: {r['error']} | | | | | |")
            continue
        checked = "-" if r["claims_checked"] is None else f"{r['claims_checked']} ({r['claims_accepted']})"
        caught = "-" if r["caught"] is None else ("yes" if r["caught"] else "no")
        out.append(
            f"| {r['seed']} | {r['check']} | {r['true_data_held_by']} | {caught} | {_g(r['caught_at_step'])} "
            f"| {checked} | {r['honest_excluded']} | {r['accuracy']:.3f} | {_g(r['honest_accuracy'], '.3f')} |"
        )
    out += [
        "",
        "Blind checks verify computation on the samples each owner encrypted, not the truth of those samples: data "
        "poisoned by its own owner before encryption passes them. Only a verifier holding the true data sees it.",
    ]
    return out


def plots(data: dict[str, Any], out: Path) -> list[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if "acceptance" not in data or "detection" not in data:
        return []
    acc, det = data["acceptance"], data["detection"]
    paths = []
    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    default = f"{acc['default_threshold']:g}"
    for mode in dict.fromkeys(c["mode"] for c in acc["cells"] if c["scale_bits"] is not None):
        cells = sorted((c for c in acc["cells"] if c["mode"] == mode), key=lambda c: c["scale_bits"])
        xs = [c["scale_bits"] for c in cells]
        left.plot(xs, [100 * c["claims"]["acceptance"][default] for c in cells], marker="o", label=mode)
        right.plot(xs, [c["claims"]["rel_l2_max"] for c in cells], marker="o", label=f"{mode} (max)")
    for t in acc["thresholds"]:
        right.axhline(t, color="grey", lw=0.6, ls="--")
    left.set(xlabel="CKKS scale bits s (Delta = 2^s)", ylabel="% honest claims accepted", title=f"threshold {default}")
    right.set(xlabel="CKKS scale bits s", ylabel="relative l2 error of honest claims", yscale="log")
    right.set_title("dashed: thresholds", fontsize=9)
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    paths.append(_save(fig, out / "acceptance.png"))

    rows = [r for r in det["rows"] if r["schedule"] == "sync"]
    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    for a in attacks:
        mine = sorted((r for r in rows if r["attack"] == a), key=lambda r: r["audit_rate"])
        left.plot(
            [r["audit_rate"] for r in mine], [r["detected"] / max(1, r["runs"]) for r in mine], marker="o", label=a
        )
    left.set(xlabel="audit rate", ylabel="detection rate", xscale="log", title="malicious worker excluded")
    left.legend(fontsize=7)
    x = np.arange(len(attacks))
    top = {r["attack"]: r for r in rows if r["audit_rate"] == max(r2["audit_rate"] for r2 in rows)}
    right.bar(x - 0.2, [top[a]["unverified_accuracy"] for a in attacks], 0.4, label="unverified")
    right.bar(
        x + 0.2,
        [top[a]["accuracy_mean"] for a in attacks],
        0.4,
        label=f"audited (rate {top[attacks[0]]['audit_rate']:g})",
    )
    right.axhline(rows[0]["honest_accuracy"], color="black", lw=0.8, ls="--", label="honest")
    right.set_xticks(x, attacks, rotation=25, fontsize=7)
    right.set(ylabel="test accuracy")
    right.legend(fontsize=7)
    fig.tight_layout()
    paths.append(_save(fig, out / "detection.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, format="png", dpi=100)
    return path
