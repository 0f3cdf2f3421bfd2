"""Part 4: what a compromised ``ps`` server can reconstruct from what it receives, plaintext vs encrypted.

For each mode and seed a real ``ps`` job (server + 2 workers, DLG's sigmoid LeNet, digits upsampled to 32x32, batch 1,
one step; the blind mode and its plaintext control: ``logreg-poly`` on 8x8 digits, the model it verifies) runs with
``record_server_view=True``: the server writes the first push it receives exactly as received (a gradient in plaintext
mode, ciphertext bytes under ``--encrypt ckks``) with the model it sent. iDLG (Zhao et al. 2020) then attacks that
file through :func:`trustgrad.attacks.on_view.attack_view`; on a ciphertext view the attacker, who holds no secret
key, can only feed the bytes in as if they were the update. Scores: PSNR of the reconstruction against the worker's
true image (capped at 100 dB) and label accuracy.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...config import RunConfig
from ...errors import TrustgradError

__all__ = ["measure", "MODES"]

log = logging.getLogger(__name__)

PSNR_CAP = 100.0
_POLY = {"dataset": "digits", "model": {"name": "logreg-poly"}, "momentum": 0.0}
MODES: dict[str, dict[str, Any]] = {  # RunConfig overrides of each mode (default: DLG's sigmoid LeNet on digits32)
    "plaintext": {},
    "ckks shared": {"crypto": {"encrypt": "ckks", "keys": "shared"}},
    "ckks threshold": {"crypto": {"encrypt": "ckks", "keys": "threshold"}},
    # blind verification checks logreg-poly on 8x8 digits: the plaintext control uses the same model and data
    "plaintext logreg-poly": _POLY,
    "blind (ckks threshold)": {**_POLY, "crypto": {"encrypt": "ckks", "keys": "threshold"}, "proof": {"mode": "blind"}},
}


def _one(mode: str, seed: int, steps: int, folder: Path) -> dict[str, Any]:
    from ...attacks.on_view import attack_view
    from ...attacks.view import load_view
    from ...run import run

    cfg = RunConfig(
        workers=2, dataset="digits32", batch_size=1, max_steps=1, seed=seed, record_server_view=True,
        out=str(folder), progress=False,
    )  # fmt: skip
    cfg = cfg.replace(model={"name": "lenet-sigmoid"}, pattern={"name": "ps"}).replace(**MODES[mode])
    try:
        run(cfg)
        files = sorted((folder / "server_view").glob("*-step*.safetensors"))
        if not files:
            return {"mode": mode, "seed": seed, "error": "the server recorded no view"}
        view = load_view(files[0])
        threads = torch.get_num_threads()
        # L-BFGS on a small net: one thread (docs/architecture.md §6: two were up to 10x slower)
        torch.set_num_threads(1)
        try:
            result = attack_view("idlg", view, steps=steps)
        finally:
            torch.set_num_threads(threads)
    except TrustgradError as exc:
        log.error("pol-he leakage %s seed %d: %s", mode, seed, exc)
        return {"mode": mode, "seed": seed, "error": str(exc).splitlines()[0]}
    psnr = float(result.metrics.get("psnr", math.nan))
    return {
        "mode": mode,
        "seed": seed,
        "view": files[0].name,
        "view_kind": view.kind,
        "view_bytes": len(view.ciphertext) if view.ciphertext else sum(g.numel() * 4 for g in view.gradients or []),
        "psnr": min(psnr, PSNR_CAP) if math.isfinite(psnr) else psnr,
        "label_accuracy": float(result.metrics.get("label_accuracy", math.nan)),
        "attack_seconds": float(result.seconds),
    }


def measure(s: Any, out: Path, data: dict[str, Any]) -> dict[str, Any]:
    runs = [
        _one(mode, seed, s.leak_steps, out / "views" / f"{mode.replace(' ', '-')}-seed{seed}")
        for mode in MODES
        for seed in range(s.seeds)
    ]
    summary = {}
    for mode in MODES:
        ok = [r for r in runs if r["mode"] == mode and "error" not in r]
        summary[mode] = {
            "runs": sum(r["mode"] == mode for r in runs),
            "errors": sum(r["mode"] == mode and "error" in r for r in runs),
            "view_kind": ok[0]["view_kind"] if ok else None,
            "psnr_mean": float(np.mean([r["psnr"] for r in ok])) if ok else math.nan,
            "label_accuracy_mean": float(np.mean([r["label_accuracy"] for r in ok])) if ok else math.nan,
        }
    return {"idlg_steps": s.leak_steps, "summary": summary, "runs": runs}
