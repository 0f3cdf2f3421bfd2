"""Writing a proof folder: checkpoints as they come, then the manifest, the indices and the commitment.

Used by the prover hook (through a background thread, so serialisation, hashing and disk writes stay off the training
thread) and by the spoofing attacks (which must produce proofs in exactly the honest format to be a fair test).
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save

from ..errors import ConfigError
from .commit import FILE_HASHES, SCHEME, file_digest, leaf, merkle_root
from .format import COMMITMENT, INDICES, MANIFEST, checkpoint_name, proof_files

__all__ = ["ProofWriter", "DirectWriter", "FileImage", "recommit"]

log = logging.getLogger(__name__)


def check_replaceable(root: Path) -> bool:
    """Whether ``root`` holds an earlier proof to replace; ``ConfigError`` if it holds anything else."""
    if root.is_symlink() or (root.exists() and not root.is_dir()):
        raise ConfigError(f"{str(root)!r} exists and is not a proof folder; choose another --out")
    if root.exists() and any(root.iterdir()) and not (root / MANIFEST).exists():
        raise ConfigError(f"{str(root)!r} holds files that are not a trustgrad proof; choose another --out")
    return root.exists()


class ProofWriter:
    """Writes one proof folder. ``add_checkpoint`` per checkpoint, then ``finish`` once; returns the root (hex)."""

    def __init__(self, root: str | Path, *, direct: bool = True):
        self.root = Path(root)
        if check_replaceable(self.root):  # a previous proof in this --out folder: no stale file may be committed
            shutil.rmtree(self.root)
        (self.root / "checkpoints").mkdir(parents=True)
        self.digests: dict[int, bytes] = {}
        self._direct = DirectWriter() if direct else None
        self.from_image = 0  # checkpoints written straight from the file image their snapshot was taken into

    def add_checkpoint(self, step: int, state: dict[str, torch.Tensor], image: FileImage | None = None) -> None:
        # streamed: the file's bytes are hashed and written tensor by tensor from the tensors' memory (through an 8 MB
        # staging buffer for direct I/O), never assembled whole (building the bytes of a ResNet-18 checkpoint cost
        # more than hashing and writing them; bench scale); hashlib, the copies and the writes release the GIL
        path = self.root / checkpoint_name(step)
        tmp = path.with_suffix(path.suffix + ".tmp")
        digest = None
        if self._direct is not None:
            if image is not None and image.holds(state):
                digest = self._direct.write_image(tmp, image)
                self.from_image += digest is not None
            else:  # the pieces are views of the tensors: nothing is copied to list them
                digest = self._direct.write(tmp, list(safetensors_pieces(state)))
        if digest is None:  # no direct I/O on this file system (tmpfs, macOS): through the page cache
            digest = _write_buffered(tmp, list(safetensors_pieces(state)))
        os.replace(tmp, path)
        self.digests[step] = digest

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
        return _commit(self.root, files)


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
    header, order, _, _ = _layout({k: (tuple(v.shape), v.dtype) for k, v in tensors.items()})
    yield header
    for name in order:
        t = tensors[name]
        if t.numel():
            yield memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _layout(spec: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> tuple[bytes, list[str], dict[str, int], int]:
    """safetensors' header (length prefix included) for tensors of these shapes and dtypes, their order in the file,
    each one's byte offset after the header, and the bytes of them all."""
    order = sorted(spec, key=lambda k: (-_ST_RANK[_ST_DTYPES[spec[k][1]]], k))
    header: dict[str, Any] = {}
    offsets, offset = {}, 0
    for name in order:
        shape, dtype = spec[name]
        size = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offsets[name] = offset
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header to a multiple of 8 bytes with spaces
    return len(text).to_bytes(8, "little") + text, order, offsets, offset


class FileImage:
    """A checkpoint file laid out in one page-aligned buffer, the safetensors header first; ``tensors`` are views of
    its data, for a snapshot to copy into (``capture_state(..., into=image.tensors)``). A snapshot taken into an
    image is hashed and written from it as it is: no copy through a staging buffer (0.02 s per 90 MB)."""

    def __init__(self, spec: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        header, _, offsets, data = _layout(spec)
        self.size = len(header) + data
        self.buffer = mmap.mmap(-1, max(DirectWriter.BLOCK, -(-self.size // DirectWriter.BLOCK) * DirectWriter.BLOCK))
        self.buffer[: len(header)] = header
        self.tensors: dict[str, torch.Tensor] = {}
        for name, (shape, dtype) in spec.items():
            count = int(np.prod(shape, dtype=np.int64))
            self.tensors[name] = (
                torch.frombuffer(self.buffer, dtype=dtype, count=count, offset=len(header) + offsets[name]).view(shape)
                if count
                else torch.empty(shape, dtype=dtype)
            )

    @classmethod
    def like(cls, state: dict[str, torch.Tensor]) -> FileImage:
        return cls({k: (tuple(v.shape), v.dtype) for k, v in state.items()})

    def holds(self, state: dict[str, torch.Tensor]) -> bool:
        """Whether ``state`` is exactly this image's tensors (a snapshot taken into it), so the image is its file."""
        return state.keys() == self.tensors.keys() and all(state[k] is self.tensors[k] for k in state)


def _write_buffered(path: Path, pieces: list[bytes | memoryview]) -> bytes:
    hasher = FILE_HASHES[SCHEME]()  # commit.file_digest, computed in pieces
    with path.open("wb") as fh:
        for piece in pieces:
            hasher.update(piece)
            fh.write(piece)
    return hasher.digest()


class DirectWriter:
    """Writes a file with direct I/O (``O_DIRECT``), bypassing the page cache, and hashes it on the way.

    Why: on this project's machines a buffered write of a 90 MB ResNet-18 checkpoint cost 0.37-0.49 s of CPU (the
    kernel allocating and filling page-cache pages), against 0.005 s direct (the disk reads the buffer itself), which
    made the write most of what recording a proof costs (docs/proof.md). Direct I/O needs block-aligned memory,
    lengths and offsets: each piece is copied through one page-aligned staging buffer (a memory copy, 0.02 s per 90 MB),
    the last block is padded and the file truncated to its true length. ``write`` returns ``None`` when the file system
    refuses direct I/O, and the caller writes through the page cache instead.
    """

    BLOCK = 1 << 12  # the largest logical block size in common use: every offset and length is a multiple of it
    STAGE = 8 << 20

    def __init__(self) -> None:
        # one staging buffer per thread: the prover's writer thread and its training thread (when the writer falls
        # behind, and at the end) may write two checkpoints at once
        self._local = threading.local()
        self.files = 0  # written directly (the others went through the page cache)

    def write(self, path: Path, pieces: list[bytes | memoryview]) -> bytes | None:
        """Write ``pieces`` through this thread's staging buffer; the file's digest, or None (write it buffered)."""
        return self._open(path, lambda fd: self._write(fd, pieces))

    def _open(self, path: Path, write: Callable[[int], bytes]) -> bytes | None:
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o644)
        except OSError:
            return None
        try:
            digest = write(fd)
            self.files += 1
            return digest
        except OSError as exc:
            # EINVAL: the file system took the open but not the aligned write (some FUSE mounts); anything else is a
            # real error, which the buffered retry reports in its own words
            log.debug("direct write of %s failed (%s); writing through the page cache", path, exc)
            return None
        finally:
            os.close(fd)

    def write_image(self, path: Path, image: FileImage) -> bytes | None:
        """Write a :class:`FileImage` as it is (already aligned, its tail zero): hashed and written, nothing copied."""
        return self._open(path, lambda fd: self._write_whole(fd, image))

    def _write_whole(self, fd: int, image: FileImage) -> bytes:
        hasher = FILE_HASHES[SCHEME]()
        _flush(fd, hasher, image.buffer, image.size, -(-image.size // self.BLOCK) * self.BLOCK)
        os.ftruncate(fd, image.size)
        return hasher.digest()

    def _write(self, fd: int, pieces: list[bytes | memoryview]) -> bytes:
        buffer = getattr(self._local, "stage", None)
        if buffer is None:
            buffer = self._local.stage = mmap.mmap(-1, self.STAGE)  # anonymous: page-aligned
        stage = np.frombuffer(buffer, dtype=np.uint8)
        hasher, fill, total = FILE_HASHES[SCHEME](), 0, 0
        for piece in pieces:
            src = np.frombuffer(piece, dtype=np.uint8)
            total += len(src)
            while len(src):
                n = min(len(src), self.STAGE - fill)
                np.copyto(stage[fill : fill + n], src[:n])  # releases the GIL, unlike a memoryview slice assignment
                fill, src = fill + n, src[n:]
                if fill == self.STAGE:
                    _flush(fd, hasher, buffer, self.STAGE, self.STAGE)
                    fill = 0
        if fill:
            padded = -(-fill // self.BLOCK) * self.BLOCK
            stage[fill:padded] = 0
            _flush(fd, hasher, buffer, fill, padded)
        os.ftruncate(fd, total)
        return hasher.digest()


def _flush(fd: int, hasher: Any, buffer: mmap.mmap, used: int, length: int) -> None:
    view = memoryview(buffer)[:length]
    hasher.update(view[:used])
    while view:  # Linux writes at most 2 GiB - 4 KiB at once: a block multiple, so the next write stays aligned
        written = os.write(fd, view)
        if written <= 0 or (written % DirectWriter.BLOCK and written != len(view)):  # unaligned next: buffered
            raise OSError(errno.EIO, f"short direct write ({written} of {len(view)} bytes)")
        view = view[written:]


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
    return _commit(root, files)


def _commit(root: Path, files: list[tuple[str, bytes]]) -> str:
    """Write ``commitment.json``: the scheme, every file's digest and the Merkle root over them; returns the root."""
    value = merkle_root([leaf(name, d) for name, d in files]).hex()
    commitment = {"scheme": SCHEME, "files": [[n, d.hex()] for n, d in files], "root": value}
    _write(root / COMMITMENT, (json.dumps(commitment, indent=1) + "\n").encode())
    return value
