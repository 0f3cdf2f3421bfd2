"""``trustgrad experiment leakage``: what a compromised server reconstructs from one worker's update, per defence.

Threat: the aggregator is honest-but-curious or compromised (docs/architecture.md §1); it knows the model it sent and
runs gradient inversion on what it receives. For each target image (digits upsampled to 32x32, batch 1; images 0..N-1,
labels 0..N-1) the experiment builds the server's view under every defence and runs every attack on it:

1. attacks: iDLG and DLG (Zhao et al. 2020; Zhu et al. 2019) on DLG's sigmoid LeNet; Inverting Gradients
   (Geiping et al. 2020) on the ReLU LeNet, where the L2 objective fails; label recovery (RLG, Dang et al. 2021) on
   the sigmoid LeNet; and the data-free baseline (a grey image and a random label: no gradient read at all);
2. defences (:mod:`trustgrad.attacks.leakage.defences`): none; Gaussian noise with std ``level x RMS`` of each
   tensor (relative to the tensor's root-mean-square, not its norm: ``0.1 x RMS`` is ``0.1 / sqrt(numel)`` of the
   norm); top-k pruning (the smallest ``fraction`` of each tensor zeroed); aggregation (the server sees the mean of W
   workers' gradients, worker 0 holding the target and the others PRF-drawn digits; scored against the target); and
   encryption (each worker's gradient is encrypted with CKKS under the workers' key — real OpenFHE ciphertexts — and
   the attacker, who has no secret key, gets only the bytes, read as an update by
   :func:`~trustgrad.attacks.view.ciphertext_as_gradients`);
3. scores (:func:`~trustgrad.attacks.leakage.score`): PSNR (capped at 100 dB for exact recoveries), SSIM and label
   accuracy, averaged over the N images.

It writes ``results.json``, ``results.md`` (defence x attack, each cell ``PSNR / SSIM / label accuracy``),
``psnr_heatmap.png`` and ``grid-ATTACK-DEFENCE.png`` (true vs reconstructed) for a few cells.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..options import OptionParser
from ..seeding import derive_seed, rng
from . import EXPERIMENTS, ExperimentResult

__all__ = ["Settings", "QUICK", "Defence", "defences", "ViewContext", "ciphertext_view", "measure_cell", "run_leakage"]

log = logging.getLogger(__name__)

PSNR_CAP = 100.0  # dB; an exact recovery has infinite PSNR, which no mean (or JSON) can hold
_POOL = 1797  # scikit-learn's digits


@dataclass(frozen=True)
class Settings:
    """Sizes of the experiment. The defaults finish in a few minutes on one thread; :data:`QUICK` in seconds."""

    images: int = 3
    steps: int = 50  # L-BFGS steps (DLG, iDLG); undefended iDLG converges in 20-45 on digits
    iterations: int = 300  # signed-Adam iterations (Inverting Gradients)
    restarts: int = 1
    noise: tuple[float, ...] = (0.01, 0.1, 1.0)  # std relative to each tensor's RMS
    prune: tuple[float, ...] = (0.5, 0.9)
    workers: tuple[int, ...] = (1, 2, 4, 8)
    seed: int = 0

    def check(self) -> None:
        if not 1 <= self.images <= 100:
            raise ConfigError(f"experiment leakage: --images must be in [1, 100], got {self.images}")
        for name in ("steps", "iterations", "restarts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"experiment leakage: --{name} must be >= 1, got {getattr(self, name)}")
        if any(not (math.isfinite(s) and s >= 0) for s in self.noise):
            raise ConfigError(f"experiment leakage: --noise levels must be finite and >= 0, got {list(self.noise)}")
        if any(not 0 <= f <= 1 for f in self.prune):
            raise ConfigError(f"experiment leakage: --prune fractions must be in [0, 1], got {list(self.prune)}")
        if any(not 1 <= w <= 64 for w in self.workers):
            raise ConfigError(f"experiment leakage: --workers must be in [1, 64], got {list(self.workers)}")


QUICK = Settings(images=1, steps=4, iterations=20, noise=(0.1,), prune=(0.9,), workers=(1, 4))


_ENCRYPTION = "encryption (CKKS)"


@dataclass(frozen=True)
class Defence:
    label: str
    kind: str  # a key of _VIEWS
    param: float = 0.0


def defences(s: Settings) -> list[Defence]:
    """The defence rows, in table order."""
    return [
        Defence("none", "none"),
        *(Defence(f"noise {v:g}xRMS", "noise", v) for v in s.noise),
        *(Defence(f"prune {f:.0%}", "prune", f) for f in s.prune),
        *(Defence(f"aggregate W={w}", "aggregate", w) for w in s.workers),
        Defence(_ENCRYPTION, "encryption"),
    ]


# --- the server's view under each defence ---------------------------------------------------------------------


@dataclass
class ViewContext:
    """What the workers share while building views: the settings, the target's index, and a lazily made CKKS key."""

    settings: Settings
    index: int = 0
    _keys: tuple[Any, Any] | None = None
    encryption: dict[str, float] = field(default_factory=dict)

    @property
    def keys(self) -> tuple[Any, Any]:
        if self._keys is None:
            from ..crypto import CKKSParams, Context, keygen

            self._keys = keygen(Context(CKKSParams.for_aggregation("shared")))
        return self._keys


def ciphertext_view(gradients: Sequence[torch.Tensor], public_key: Any) -> tuple[bytes, list[torch.Tensor]]:
    """Encrypt the flat update under ``public_key`` (CKKS, OpenFHE) and return (ciphertext bytes, what an attacker
    without the secret key makes of those bytes)."""
    from ..attacks.view import ciphertext_as_gradients
    from ..crypto import encrypt

    flat = torch.cat([g.detach().reshape(-1) for g in gradients]).to(torch.float64).cpu().numpy()
    data = encrypt(public_key, flat).to_bytes()
    return data, ciphertext_as_gradients(data, [g.shape for g in gradients])


def _observe(model: nn.Module, x: Tensor, y: Tensor, param: float, env: ViewContext) -> list[Tensor]:
    from ..attacks.leakage import observe_gradients

    return observe_gradients(model, x, y)


def _noise(model: nn.Module, x: Tensor, y: Tensor, param: float, env: ViewContext) -> list[Tensor]:
    from ..attacks.leakage.defences import gaussian_noise

    seed = derive_seed(env.settings.seed, "noise", env.index)
    return gaussian_noise(_observe(model, x, y, 0, env), param, seed=seed, relative_to="rms")


def _prune(model: nn.Module, x: Tensor, y: Tensor, param: float, env: ViewContext) -> list[Tensor]:
    from ..attacks.leakage.defences import prune

    return prune(_observe(model, x, y, 0, env), param)


def _aggregate(model: nn.Module, x: Tensor, y: Tensor, param: float, env: ViewContext) -> list[Tensor]:
    from ..attacks.leakage import digits
    from ..attacks.leakage.defences import aggregated_view

    pool = np.arange(env.settings.images, _POOL)  # never another target image
    others = rng(env.settings.seed, "aggregate", env.index).choice(pool, size=int(param) - 1, replace=False)
    return aggregated_view(model, [(x, y), *(digits([int(i)]) for i in others)])


def _encrypt(model: nn.Module, x: Tensor, y: Tensor, param: float, env: ViewContext) -> list[Tensor]:
    from ..crypto import EncryptedVector, decrypt

    plain = _observe(model, x, y, 0, env)
    public_key, secret_key = env.keys
    data, seen = ciphertext_view(plain, public_key)
    # the key holders (workers) can read it back: these are real ciphertexts of this gradient, not noise
    back = decrypt(secret_key, EncryptedVector.from_bytes(public_key.context, data, public_key=public_key))
    flat = torch.cat([g.reshape(-1) for g in plain]).to(torch.float64).numpy()
    env.encryption["ciphertext_bytes"] = len(data)
    env.encryption["max_decrypt_error"] = max(
        env.encryption.get("max_decrypt_error", 0.0), float(np.abs(back - flat).max())
    )
    return seen


_VIEWS: dict[str, Callable[..., list[torch.Tensor]]] = {
    "none": _observe,
    "noise": _noise,
    "prune": _prune,
    "aggregate": _aggregate,
    "encryption": _encrypt,
}

# --- attacks ---------------------------------------------------------------------------------------------------

#: attack -> victim network (see the module docstring for why IG runs on ReLU)
ATTACK_ROWS: tuple[tuple[str, str], ...] = (
    ("idlg", "sigmoid"),
    ("dlg", "sigmoid"),
    ("inverting-gradients", "relu"),
    ("label-recovery", "sigmoid"),
)
IMAGE_ATTACKS = ("idlg", "dlg", "inverting-gradients")


def _victim(kind: str) -> torch.nn.Module:
    from ..attacks.leakage import lenet_relu, lenet_sigmoid

    return {"sigmoid": lenet_sigmoid, "relu": lenet_relu}[kind](1, 10, seed=0)


def _config(attack: str, s: Settings, index: int) -> dict[str, Any]:
    seed = derive_seed(s.seed, attack, index)
    return {
        "idlg": {"steps": s.steps, "restarts": s.restarts, "seed": seed},
        "dlg": {"steps": s.steps, "restarts": s.restarts, "seed": seed},
        "inverting-gradients": {"iterations": s.iterations, "restarts": s.restarts, "seed": seed},
        "label-recovery": {},
        "data-free": {"seed": seed},
    }[attack]


def measure_cell(
    attack: str, defence: Defence, indices: Sequence[int], s: Settings, env: ViewContext | None = None
) -> dict[str, Any]:
    """Run ``attack`` on the view under ``defence`` for each target digit in ``indices`` (batch 1 each).

    Returns the mean metrics (``psnr``, ``ssim`` for image attacks; ``label_accuracy``), ``per_image`` dicts,
    ``reconstructions`` (a tensor, image attacks only) and ``seconds``.
    """
    from ..attacks.leakage import GroundTruth, InputSpec, digits, run_attack

    env = env or ViewContext(s)
    model = _victim(dict(ATTACK_ROWS).get(attack, "sigmoid"))
    spec = InputSpec((1, 32, 32))
    per, recs, start = [], [], time.perf_counter()
    for index in indices:
        env.index = int(index)
        x, y = digits([int(index)])
        view = [] if attack == "data-free" else _VIEWS[defence.kind](model, x, y, defence.param, env)
        r = run_attack(attack, model, view, spec=spec, truth=GroundTruth(x, y), **_config(attack, s, int(index)))
        m = {k: float(v) for k, v in r.metrics.items()}
        if "psnr" in m:
            m["psnr"] = min(m["psnr"], PSNR_CAP)
            recs.append(r.reconstruction)
        per.append({"index": int(index), "label": int(y), "recovered": list(r.labels), "seconds": r.seconds, **m})
    out: dict[str, Any] = {"attack": attack, "defence": defence.label, "seconds": time.perf_counter() - start}
    for key in ("psnr", "ssim", "label_accuracy", "label_accuracy_expected"):
        if key in per[0]:
            out[key] = float(np.mean([p[key] for p in per]))
    out["per_image"] = per
    out["reconstructions"] = torch.cat(recs) if recs else None
    return out


# --- the experiment ----------------------------------------------------------------------------------------------


def run_leakage(s: Settings, out: Path) -> ExperimentResult:
    """Run every attack x defence cell and the data-free baseline; write the table, JSON and PNGs under ``out``."""
    from ..attacks.leakage import digits
    from ..attacks.leakage.plots import save_grid

    s.check()
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # L-BFGS on small models: two threads were 10x slower on 2 cores (field notes)
    try:
        indices = list(range(s.images))
        truth, _ = digits(indices)
        env = ViewContext(s)
        cells: list[dict[str, Any]] = []
        for attack, _victim_kind in ATTACK_ROWS:
            for d in defences(s):
                cell = measure_cell(attack, d, indices, s, env)
                log.info("leakage %s x %s: %s (%.1f s)", attack, d.label, _cell_text(cell), cell["seconds"])
                cells.append(cell)
        baseline = measure_cell("data-free", Defence("none", "none"), indices, s, env)
        log.info("leakage data-free baseline: %s", _cell_text(baseline))
    finally:
        torch.set_num_threads(threads)
    pngs = [_heatmap(cells, baseline, s, out / "psnr_heatmap.png")]
    for c in cells:  # every defence for iDLG (the strongest attack here), none and encryption for the others
        if c["reconstructions"] is not None and (c["attack"] == "idlg" or c["defence"] in ("none", _ENCRYPTION)):
            name = f"grid-{c['attack']}-{_slug(c['defence'])}.png"
            title = f"{c['attack']} under {c['defence']}: PSNR {c['psnr']:.1f} dB"
            pngs.append(save_grid(out / name, truth, c["reconstructions"], title=title, order=list(range(s.images))))
    table = _table(cells, baseline, s)
    data = {
        "settings": asdict(s),
        "cells": [{k: v for k, v in c.items() if k != "reconstructions"} for c in cells],
        "baseline": {k: v for k, v in baseline.items() if k != "reconstructions"},
        "encryption": env.encryption,
        "pngs": [p.name for p in pngs],
    }
    (out / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "results.md").write_text(table + "\n")
    return ExperimentResult("leakage", table, out, data)


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in label.lower()).strip("-").replace("--", "-")


def _cell_text(c: dict[str, Any]) -> str:
    psnr = f"{c['psnr']:.1f}" if "psnr" in c else "-"
    ssim = f"{c['ssim']:.2f}" if "ssim" in c else "-"
    return f"{psnr} / {ssim} / {c['label_accuracy']:.2f}"


def _table(cells: list[dict[str, Any]], baseline: dict[str, Any], s: Settings) -> str:
    attacks = [a for a, _ in ATTACK_ROWS]
    by = {(c["attack"], c["defence"]): c for c in cells}
    lines = [
        f"Gradient leakage on digits 32x32, batch 1, mean over {s.images} image(s); each cell PSNR dB / SSIM / label "
        f"accuracy (label-recovery: Jaccard of label sets). DLG/iDLG {s.steps} L-BFGS steps, Inverting Gradients "
        f"{s.iterations} iterations, {s.restarts} restart(s); noise std relative to each tensor's RMS.",
        "",
        "| defence | " + " | ".join(f"{a} ({v})" for a, v in ATTACK_ROWS) + " |",
        "|---" * (len(attacks) + 1) + "|",
    ]
    for d in defences(s):
        lines.append(f"| {d.label} | " + " | ".join(_cell_text(by[(a, d.label)]) for a in attacks) + " |")
    lines.append("| data-free baseline (no gradient) | " + " | ".join(_cell_text(baseline) for _ in attacks) + " |")
    lines += [
        "",
        f"Expected label accuracy of a guess without gradients: {baseline['label_accuracy_expected']:.2f} (1/C).",
    ]
    return "\n".join(lines)


def _heatmap(cells: list[dict[str, Any]], baseline: dict[str, Any], s: Settings, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [d.label for d in defences(s)]
    by = {(c["attack"], c["defence"]): c for c in cells}
    panels = [
        ("PSNR (dB)", "psnr", list(IMAGE_ATTACKS)),
        ("label accuracy", "label_accuracy", [a for a, _ in ATTACK_ROWS]),
    ]
    fig = Figure(figsize=(12, 0.45 * len(rows) + 2))
    FigureCanvasAgg(fig)
    for ax, (title, key, cols) in zip(fig.subplots(1, 2), panels, strict=True):
        grid = np.array([[by[(a, r)][key] for a in cols] for r in rows])
        im = ax.imshow(grid, cmap="magma", aspect="auto", vmin=0, vmax=max(40.0, grid.max()) if key == "psnr" else 1)
        for i in range(len(rows)):
            for j in range(len(cols)):
                v = grid[i, j]
                dark = v < (20 if key == "psnr" else 0.5)
                text = f"{v:.1f}" if key == "psnr" else f"{v:.2f}"
                ax.text(j, i, text, ha="center", va="center", color="white" if dark else "black", fontsize=8)
        ax.set_xticks(range(len(cols)), cols, rotation=20, fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        note = f" (expected {baseline['label_accuracy_expected']:.2f})" if key == "label_accuracy" else ""
        ax.set_title(f"{title}; data-free baseline {baseline[key]:.2f}{note}", fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"What the server reconstructs, per attack x defence (digits, mean of {s.images} image(s))")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return path


# --- command line ------------------------------------------------------------------------------------------------


@EXPERIMENTS.register("leakage")
def run_experiment(argv: list[str]) -> ExperimentResult:
    d = Settings()
    parser = OptionParser(prog="trustgrad experiment leakage", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/leakage", help="folder for results.json, results.md and the PNGs")
    parser.add_argument("--images", type=int, help=f"target digits 0..N-1 (default {d.images}; --quick 1)")
    parser.add_argument("--steps", type=int, help=f"L-BFGS steps of DLG/iDLG (default {d.steps})")
    parser.add_argument("--iterations", type=int, help=f"Inverting Gradients iterations (default {d.iterations})")
    parser.add_argument("--restarts", type=int, help="random restarts per attack, best by gradient distance kept")
    parser.add_argument("--noise", type=float, nargs="+", help="noise std levels relative to RMS (0.01 0.1 1)")
    parser.add_argument("--prune", type=float, nargs="+", help="pruned fractions (0.5 0.9)")
    parser.add_argument("--workers", type=int, nargs="+", help="aggregation over W workers (1 2 4 8)")
    parser.add_argument("--seed", type=int, help="seed of noise, attacks and other workers' images")
    parser.add_argument("--quick", action="store_true", help="a tiny version (1 image, few steps) for tests")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else d
    over = {k: getattr(args, k) for k in ("images", "steps", "iterations", "restarts", "seed")}
    over.update({k: tuple(getattr(args, k)) for k in ("noise", "prune", "workers") if getattr(args, k)})
    settings = Settings(**{**asdict(base), **{k: v for k, v in over.items() if v is not None}})
    settings.check()
    return run_leakage(settings, Path(args.out))
