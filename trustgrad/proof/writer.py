"""Writing a proof folder: checkpoints as they come, then the manifest, the indices and the commitment.

Used by the prover hook (through a background thread, so serialisation, hashing and disk writes stay off the training
thread) and by the spoofing attacks (which must produce proofs in exactly the honest format to be a fair test).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save

from ..errors import ConfigError
from .commit import digest, leaf, merkle_root
from .format import COMMITMENT, INDICES, MANIFEST, checkpoint_name, proof_files

__all__ = ["ProofWriter", "recommit"]


def check_replaceable(root: Path) -> bool:
    """Whether ``root`` holds an earlier proof to replace; ``ConfigError`` if it holds anything else."""
    if root.is_symlink() or (root.exists() and not root.is_dir()):
        raise ConfigError(f"{str(root)!r} exists and is not a proof folder; choose another --out")
    if root.exists() and any(root.iterdir()) and not (root / MANIFEST).exists():
        raise ConfigError(f"{str(root)!r} holds files that are not a trustgrad proof; choose another --out")
    return root.exists()


class ProofWriter:
    """Writes one proof folder. ``add_checkpoint`` per checkpoint, then ``finish`` once; returns the root (hex)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if check_replaceable(self.root):  # a previous proof in this --out folder: no stale file may be committed
            shutil.rmtree(self.root)
        (self.root / "checkpoints").mkdir(parents=True)
        self.digests: dict[int, bytes] = {}

    def add_checkpoint(self, step: int, state: dict[str, torch.Tensor]) -> None:
        data = save({k: v.contiguous() for k, v in state.items()})
        self.digests[step] = digest(data)
        _write(self.root / checkpoint_name(step), data)

    def finish(self, manifest: dict[str, Any], indices: np.ndarray) -> str:
        steps = sorted(self.digests)
        manifest = {**manifest, "checkpoints": steps}
        manifest_bytes = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
        _write(self.root / MANIFEST, manifest_bytes)
        index_bytes = save({"indices": torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64))})
        _write(self.root / INDICES, index_bytes)
        files = [(MANIFEST, digest(manifest_bytes))]
        files += [(checkpoint_name(s), self.digests[s]) for s in steps]
        files.append((INDICES, digest(index_bytes)))
        root = merkle_root([leaf(name, d) for name, d in files]).hex()
        commitment = {"scheme": "merkle-blake2b-256", "files": [[n, d.hex()] for n, d in files], "root": root}
        _write(self.root / COMMITMENT, (json.dumps(commitment, indent=1) + "\n").encode())
        return root


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def recommit(root: str | Path) -> str:
    """Recompute ``commitment.json`` from the files as they are now (what a prover who edits before committing does).

    Only for attacks and tests: an honest prover commits once, as it finishes training.
    """
    root = Path(root)
    manifest = json.loads((root / MANIFEST).read_text())
    files = [(name, digest((root / name).read_bytes())) for name in proof_files(manifest["checkpoints"])]
    value = merkle_root([leaf(name, d) for name, d in files]).hex()
    commitment = {"scheme": "merkle-blake2b-256", "files": [[n, d.hex()] for n, d in files], "root": value}
    _write(root / COMMITMENT, (json.dumps(commitment, indent=1) + "\n").encode())
    return value
