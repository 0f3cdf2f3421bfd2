"""Writing a proof folder: checkpoints as they come, then the manifest, the indices and the commitment.

Used by the prover hook (through a background thread, so serialisation, hashing and disk writes stay off the training
thread) and by the spoofing attacks (which must produce proofs in exactly the honest format to be a fair test).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save

from ..errors import ConfigError
from .commit import FILE_HASHES, SCHEME, file_digest, leaf, merkle_root
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
        # streamed: the file's bytes are hashed and written tensor by tensor, straight from the tensors' memory, never
        # assembled in memory (building the bytes of a ResNet-18 checkpoint cost more than hashing and writing them;
        # bench scale); hashlib and the write release the GIL on these large buffers
        hasher = FILE_HASHES[SCHEME]()  # commit.file_digest, computed in pieces
        path = self.root / checkpoint_name(step)
        tmp = path.with_suffix(path.suffix + ".tmp")
        with tmp.open("wb") as fh:
            for piece in safetensors_pieces(state):
                hasher.update(piece)
                fh.write(piece)
        os.replace(tmp, path)
        self.digests[step] = hasher.digest()

    def finish(self, manifest: dict[str, Any], indices: np.ndarray) -> str:
        steps = sorted(self.digests)
        manifest = {**manifest, "checkpoints": steps}
        manifest_bytes = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
        _write(self.root / MANIFEST, manifest_bytes)
        index_bytes = save({"indices": torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64))})
        _write(self.root / INDICES, index_bytes)
        files = [(MANIFEST, file_digest(manifest_bytes))]
        files += [(checkpoint_name(s), self.digests[s]) for s in steps]
        files.append((INDICES, file_digest(index_bytes)))
        root = merkle_root([leaf(name, d) for name, d in files]).hex()
        commitment = {"scheme": SCHEME, "files": [[n, d.hex()] for n, d in files], "root": root}
        _write(self.root / COMMITMENT, (json.dumps(commitment, indent=1) + "\n").encode())
        return root


#: safetensors' dtype names, in the order its writer sorts tensors (its ``Dtype`` enum): larger first, then by name
_ST_DTYPES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64", torch.int64: "I64",
}  # fmt: skip
_ST_RANK = {name: i for i, name in enumerate(_ST_DTYPES.values())}


def safetensors_pieces(state: dict[str, torch.Tensor]) -> Iterator[bytes | memoryview]:
    """The bytes ``safetensors.torch.save(state)`` returns, as the header and then each tensor's own memory
    (tests/test_proof_writer.py checks they are identical): a checkpoint is written and hashed without a copy of it."""
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    order = sorted(tensors, key=lambda k: (-_ST_RANK[_ST_DTYPES[tensors[k].dtype]], k))
    header: dict[str, Any] = {}
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header to a multiple of 8 bytes with spaces
    yield len(text).to_bytes(8, "little") + text
    for name in order:
        t = tensors[name]
        if t.numel():
            yield memoryview(t.reshape(-1).view(torch.uint8).numpy())


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
    files = [(name, file_digest((root / name).read_bytes())) for name in proof_files(manifest["checkpoints"])]
    value = merkle_root([leaf(name, d) for name, d in files]).hex()
    commitment = {"scheme": SCHEME, "files": [[n, d.hex()] for n, d in files], "root": value}
    _write(root / COMMITMENT, (json.dumps(commitment, indent=1) + "\n").encode())
    return value
