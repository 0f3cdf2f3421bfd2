"""Datasets (a registry) and deterministic sharding.

Embedded defaults ship with scikit-learn, so nothing is downloaded at run time: ``digits`` (1,797 real 8x8 handwritten
digits) and ``breast-cancer`` (569 samples, 30 features, binary). ``synthetic`` is seeded and of any size. Files a user
already has are read from ``--data-dir``: ``mnist`` (idx files, optionally gzipped) and ``cifar10`` (the binary
batches, or the python batches through a restricted unpickler that admits nothing but numpy arrays).

>>> ds = load_dataset("digits")
>>> (ds.input_shape, ds.num_classes, len(ds.x_train) + len(ds.x_test))
((1, 8, 8), 10, 1797)
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import factories
from .errors import ConfigError, DataError
from .registry import Registry
from .seeding import epoch_permutation, rng

__all__ = [
    "Dataset",
    "DATASETS",
    "load_dataset",
    "shard_indices",
    "dirichlet_shards",
    "sample_hashes",
    "BatchPlan",
    "as_dataset",
    "save_tensors",
]


@dataclass(frozen=True)
class Dataset:
    """A train/test split as tensors: float32 inputs shaped ``(n, *input_shape)``, int64 labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


DatasetLoader = Callable[..., Dataset]
DATASETS: Registry[DatasetLoader] = Registry("dataset")


def load_dataset(name: str, data_dir: str | Path | None = None, **options: int) -> Dataset:
    """Load a registered dataset by name (``ConfigError`` listing the known names if unknown).

    Embedded datasets are cached per process (the parent's checks, the server and the auditor share one copy):
    treat the tensors as read-only.
    """
    if factories.is_factory(name):  # a user's factory: built once per process, like the embedded sets
        return _user_dataset(name)
    loader = DATASETS.get(name)
    if data_dir is not None:  # users' files are read afresh: they may change between runs of one process
        return loader(data_dir=data_dir, **options)
    return _embedded(name, tuple(sorted(options.items())))


@functools.lru_cache(maxsize=8)
def _embedded(name: str, options: tuple[tuple[str, int], ...]) -> Dataset:
    return DATASETS.get(name)(**dict(options))


@functools.lru_cache(maxsize=4)
def _user_dataset(name: str) -> Dataset:
    """``factory()`` returns a ``Dataset``, or ``(train, test)`` where each is a torch ``Dataset`` of (x, y) pairs or
    a pair of tensors ``(x, y)``; labels are class indices."""
    made = factories.call(name, "dataset factory")
    if isinstance(made, Dataset):
        return made
    if not (isinstance(made, (tuple, list)) and len(made) == 2):
        raise ConfigError(
            f"dataset factory {name!r} returned a {type(made).__name__}: expected a trustgrad Dataset or "
            "(train, test), each a torch Dataset or (x, y) tensors"
        )
    return as_dataset(name, *made)


def as_dataset(name: str, train: Any, test: Any, num_classes: int | None = None) -> Dataset:
    """A ``Dataset`` from two torch datasets or two ``(x, y)`` pairs (the API's and the dataset factories' input).

    >>> x, y = torch.zeros(8, 3), torch.arange(8) % 2
    >>> as_dataset("t", (x, y), (x, y)).num_classes
    2
    """
    x_tr, y_tr = _tensors(name, "train", train)
    x_te, y_te = _tensors(name, "test", test)
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"dataset {name!r}: train inputs are {tuple(x_tr.shape[1:])}, test {tuple(x_te.shape[1:])}")
    classes = num_classes or int(max(int(y_tr.max()), int(y_te.max()))) + 1
    if int(min(y_tr.min(), y_te.min())) < 0 or int(max(y_tr.max(), y_te.max())) >= classes:
        raise DataError(f"dataset {name!r}: labels must be class indices in [0, {classes})")
    return Dataset(name, x_tr, y_tr, x_te, y_te, classes)


def _tensors(name: str, split: str, data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 inputs, int64 labels) of a pair of tensors or of a map-style torch Dataset of (x, y) items."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(hasattr(t, "shape") for t in data):
        x, y = (torch.as_tensor(t) for t in data)
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        items = [data[i] for i in range(len(data))]
        if not items or not all(isinstance(it, (tuple, list)) and len(it) == 2 for it in items):
            raise DataError(f"dataset {name!r}: the {split} split must be non-empty (x, y) items")
        x = torch.stack([torch.as_tensor(it[0]) for it in items])
        y = torch.as_tensor([int(it[1]) for it in items])
    else:
        raise DataError(f"dataset {name!r}: the {split} split is a {type(data).__name__}, not (x, y) or a Dataset")
    if len(x) == 0 or len(x) != len(y) or y.dim() != 1:
        raise DataError(f"dataset {name!r}: the {split} split needs as many labels as inputs (one class index each)")
    if not torch.is_floating_point(x) and x.dtype not in (torch.uint8, torch.int64, torch.int32):
        raise DataError(f"dataset {name!r}: {split} inputs of dtype {x.dtype} are not numbers")
    return x.detach().float().contiguous().clone(), y.detach().long().contiguous().clone()


def shard_indices(n: int, worker: int, workers: int, seed: int) -> np.ndarray:
    """Training-set indices owned by ``worker``: a seeded permutation cut into equal contiguous shards.

    The remainder ``n % workers`` is left out so that every worker of a synchronous job has the same number of steps.
    """
    if not 0 <= worker < workers:
        raise ValueError(f"worker {worker} out of range for {workers} workers")
    size = n // workers
    if size == 0:
        raise DataError(f"{n} training samples cannot be sharded across {workers} workers")
    perm = rng(seed, "shard").permutation(n)
    return np.sort(perm[worker * size : (worker + 1) * size])


def dirichlet_shards(labels: np.ndarray, workers: int, seed: int, alpha: float) -> list[np.ndarray]:
    """Label-skewed shards of equal size (Hsu et al. 2019's Dirichlet split, the non-IID benchmark of the robustness
    literature): worker w draws its class mix ``p_w ~ Dir(alpha)``; the shards are filled one sample per worker in
    turn, each worker taking a class by ``p_w`` among those not yet used up. Equal sizes keep every worker of a
    synchronous job on the same number of steps; small ``alpha`` gives each worker few classes.

    >>> y = np.repeat(np.arange(4), 25)
    >>> [len(s) for s in dirichlet_shards(y, 4, seed=0, alpha=0.1)]
    [25, 25, 25, 25]
    """
    size = len(labels) // workers
    if size == 0:
        raise DataError(f"{len(labels)} training samples cannot be sharded across {workers} workers")
    r = rng(seed, "dirichlet", workers)
    classes = np.unique(labels)
    mix = r.dirichlet(np.full(len(classes), alpha), size=workers)
    pools = [list(r.permutation(np.flatnonzero(labels == c))) for c in classes]
    left = np.array([len(p) for p in pools], dtype=np.float64)
    shards: list[list[int]] = [[] for _ in range(workers)]
    for _ in range(size):
        for w in range(workers):
            p = mix[w] * (left > 0)
            # a worker whose classes are all used up takes from what is left, in proportion to what is left
            p = p / p.sum() if p.sum() > 0 else left / left.sum()
            c = int(r.choice(len(classes), p=p))
            shards[w].append(int(pools[c].pop()))
            left[c] -= 1
    return [np.sort(np.array(s, dtype=np.int64)) for s in shards]


@dataclass(frozen=True)
class BatchPlan:
    """Which samples every worker trains on at every step: its shard and the PRF batch order of the run's seed.

    The one place trainers, provers, verifiers, auditors and attackers get batches from (nothing the prover chooses).
    Each (worker, epoch) permutation is computed once.
    """

    n: int
    workers: int
    seed: int
    batch_size: int
    partition: str = "iid"  # iid | dirichlet
    alpha: float = 0.5  # dirichlet concentration
    labels: bytes = b""  # the training labels (int64 bytes) a label-skewed partition reads; hashable, unlike arrays

    @classmethod
    def for_run(cls, cfg: Any, dataset: Dataset, workers: int) -> BatchPlan:
        """The plan of a run: its partition (``cfg.partition``), shards and PRF batch order."""
        partition = getattr(cfg, "partition", "iid")
        labels = dataset.y_train.numpy().astype(np.int64).tobytes() if partition != "iid" else b""
        alpha = getattr(cfg, "partition_alpha", 0.5)
        return cls(len(dataset.x_train), workers, cfg.seed, cfg.batch_size, partition, alpha, labels)

    @functools.cached_property
    def shards(self) -> list[np.ndarray]:
        if self.partition == "dirichlet":
            labels = np.frombuffer(self.labels, dtype=np.int64)
            return dirichlet_shards(labels, self.workers, self.seed, self.alpha)
        return [shard_indices(self.n, w, self.workers, self.seed) for w in range(self.workers)]

    @property
    def steps_per_epoch(self) -> int:
        return len(self.shards[0]) // self.batch_size

    def total_steps(self, epochs: int, max_steps: int | None = None) -> int:
        total = self.steps_per_epoch * epochs
        return total if max_steps is None else min(max_steps, total)

    def batch(self, worker: int, epoch: int, epoch_step: int) -> np.ndarray:
        """Global training-set indices of ``worker``'s batch at step ``epoch_step`` of ``epoch``."""
        b = self.batch_size
        return self.shards[worker][self._order(worker, epoch)[epoch_step * b : (epoch_step + 1) * b]]

    def at(self, worker: int, step: int) -> np.ndarray:
        """The batch of a global step index."""
        return self.batch(worker, *divmod(step, self.steps_per_epoch))

    def all_indices(self, steps: int) -> np.ndarray:
        """``[steps, workers, batch_size]``: every worker's batch of every step."""
        out = np.empty((steps, self.workers, self.batch_size), dtype=np.int64)
        for t in range(steps):
            for w in range(self.workers):
                out[t, w] = self.at(w, t)
        return out

    @functools.lru_cache(maxsize=64)  # noqa: B019 - plans are few, small and live as long as their run
    def _order(self, worker: int, epoch: int) -> np.ndarray:
        return epoch_permutation(self.seed, worker, epoch, len(self.shards[worker]))


def sample_hashes(x: torch.Tensor, y: torch.Tensor) -> list[bytes]:
    """BLAKE2b of each sample's raw bytes with its dtype and shape, and its label (never ``str(array)``)."""
    xs = x.detach().cpu().contiguous().numpy()
    ys = y.detach().cpu().numpy()
    header = f"{xs.dtype.str}{xs.shape[1:]}|{ys.dtype.str}".encode()
    return [
        hashlib.blake2b(header + xs[i].tobytes() + ys[i].tobytes(), digest_size=32).digest() for i in range(len(xs))
    ]


# --------------------------------------------------------------------------------------------------------------------
# helpers


def _split(name: str, x: np.ndarray, y: np.ndarray, num_classes: int, test_fraction: float = 0.2) -> Dataset:
    """A deterministic stratified split (fixed seed, independent of the run's seed: all runs share one test set)."""
    from sklearn.model_selection import train_test_split

    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=0, stratify=y)
    return _as_dataset(name, x_tr, y_tr, x_te, y_te, num_classes)


def _as_dataset(name: str, x_tr, y_tr, x_te, y_te, num_classes: int) -> Dataset:
    t = lambda a, dt: torch.from_numpy(np.array(a)).to(dt)  # noqa: E731  (a writable copy)
    return Dataset(
        name, t(x_tr, torch.float32), t(y_tr, torch.int64), t(x_te, torch.float32), t(y_te, torch.int64), num_classes
    )


def _standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-8
    return (x_train - mean) / std, (x_test - mean) / std


def _require(data_dir: str | Path | None, dataset: str, candidates: list[list[str]]) -> list[Path]:
    """Resolve each required file (first existing of its alternatives) or raise naming what is missing."""
    if data_dir is None:
        raise DataError(f"dataset {dataset!r} reads local files: pass --data-dir DIR (nothing is downloaded)")
    root = Path(data_dir)
    found, missing = [], []
    for alternatives in candidates:
        path = next((root / c for c in alternatives if (root / c).is_file()), None)
        if path is None:
            missing.append(alternatives[0])
        else:
            found.append(path)
    if missing:
        raise DataError(f"dataset {dataset!r}: missing {', '.join(missing)} in {str(root)!r} (nothing is downloaded)")
    return found


# --------------------------------------------------------------------------------------------------------------------
# embedded datasets


@DATASETS.register("digits")
def _digits(data_dir: str | Path | None = None) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    return _split("digits", x, bunch.target, 10)


@DATASETS.register("digits32")
def _digits32(data_dir: str | Path | None = None) -> Dataset:
    """``digits`` bilinearly upsampled to 32x32: the input size of DLG's LeNet (gradient-leakage experiments)."""
    ds = _digits()
    up = lambda x: torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear").clamp(0, 1)  # noqa: E731
    return Dataset("digits32", up(ds.x_train), ds.y_train, up(ds.x_test), ds.y_test, ds.num_classes)


@DATASETS.register("breast-cancer")
def _breast_cancer(data_dir: str | Path | None = None) -> Dataset:
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    bunch = load_breast_cancer()
    x_tr, x_te, y_tr, y_te = train_test_split(
        bunch.data, bunch.target, test_size=0.2, random_state=0, stratify=bunch.target
    )
    x_tr, x_te = _standardize(x_tr, x_te)
    return _as_dataset("breast-cancer", x_tr, y_tr, x_te, y_te, 2)


@DATASETS.register("synthetic")
def _synthetic(
    data_dir: str | Path | None = None, n: int = 4096, features: int = 64, classes: int = 10, seed: int = 0
) -> Dataset:
    """Gaussian class clusters in ``features`` dimensions, seeded: a stand-in of any size for benchmarks."""
    g = rng(seed, "synthetic")
    centers = g.normal(0.0, 1.0, size=(classes, features))
    y = g.integers(0, classes, size=n)
    x = (centers[y] + g.normal(0.0, 1.5, size=(n, features))).astype(np.float32)
    return _split("synthetic", x, y, classes)


@DATASETS.register("synthetic-cifar")
def _synthetic_cifar(data_dir: str | Path | None = None, n: int = 2560, classes: int = 10, seed: int = 0) -> Dataset:
    """CIFAR-shaped (3x32x32) and seeded: each class is a smooth random template (8x8 upsampled by 4, so random
    crops of 4 pixels and flips keep most of it) plus per-pixel noise. Learnable, the same on every machine, and
    ``n`` may be anything: a stand-in for CIFAR-10 where none is at hand (tests, ``bench scale``)."""
    g = rng(seed, "synthetic-cifar")
    templates = np.repeat(np.repeat(g.normal(0.0, 1.0, size=(classes, 3, 8, 8)), 4, axis=2), 4, axis=3)
    y = g.integers(0, classes, size=n)
    x = (templates[y] + g.normal(0.0, 1.0, size=(n, 3, 32, 32))).astype(np.float32)
    return _split("synthetic-cifar", x, y, classes)


# --------------------------------------------------------------------------------------------------------------------
# user files


def _read_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    try:
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError) as exc:
        raise DataError(f"{path.name}: not a readable gzip file ({exc})") from None


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    """An idx file (LeCun's MNIST format): magic 0x0000 0x08 ndim, big-endian dims, then uint8 data."""
    raw = _read_maybe_gzip(path)
    if len(raw) < 4 or raw[0:2] != b"\x00\x00" or raw[2] != 0x08 or raw[3] != expected_dims:
        raise DataError(f"{path.name}: not an idx file of {expected_dims} dimensions")
    if len(raw) < 4 + 4 * expected_dims:
        raise DataError(f"{path.name}: truncated idx header")
    dims = struct.unpack(f">{expected_dims}I", raw[4 : 4 + 4 * expected_dims])
    body = raw[4 + 4 * expected_dims :]
    if len(body) != int(np.prod(dims)):
        raise DataError(f"{path.name}: header says {dims} but the file holds {len(body)} bytes")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


TENSORS_FILE = "dataset.safetensors"
_TENSOR_KEYS = ("x_train", "y_train", "x_test", "y_test")


@DATASETS.register("tensors")
def _tensors_file(data_dir: str | Path | None = None) -> Dataset:
    """A user's in-memory data as the API saved it (``save_tensors``): ``DIR/dataset.safetensors`` (never pickle)."""
    from safetensors.torch import load_file

    (path,) = _require(data_dir, "tensors", [[TENSORS_FILE]])
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # the Rust parser's SafetensorError, or an OS error: the file is unusable
        raise DataError(f"{path.name}: not a readable safetensors file ({type(exc).__name__})") from None
    missing = [k for k in _TENSOR_KEYS if k not in tensors]
    if missing:
        raise DataError(f"{path.name}: missing tensors {missing}")
    x_tr, y_tr, x_te, y_te = (tensors[k] for k in _TENSOR_KEYS)
    return as_dataset("tensors", (x_tr, y_tr), (x_te, y_te))


def save_tensors(ds: Dataset, folder: str | Path) -> Path:
    """Write ``ds`` where every rank and the verifier read it back as dataset ``tensors`` (``--data-dir folder``)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = dict(zip(_TENSOR_KEYS, (ds.x_train, ds.y_train, ds.x_test, ds.y_test)))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / TENSORS_FILE))
    return folder


@DATASETS.register("mnist")
def _mnist(data_dir: str | Path | None = None) -> Dataset:
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    paths = _require(data_dir, "mnist", [[n, n + ".gz", n.replace("-idx", ".idx")] for n in names])
    x_tr, y_tr, x_te, y_te = (_read_idx(p, d) for p, d in zip(paths, (3, 1, 3, 1)))
    if len(x_tr) != len(y_tr) or len(x_te) != len(y_te):
        raise DataError("mnist: image and label counts differ")
    scale = lambda a: (a.astype(np.float32) / 255.0)[:, None]  # noqa: E731
    return _as_dataset("mnist", scale(x_tr), y_tr, scale(x_te), y_te, 10)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10's python batches are pickles; admit only what they contain (dicts, bytes, lists, numpy arrays)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"refusing to load {module}.{name} from a CIFAR batch (only numpy arrays are allowed)")


def _cifar_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _NumpyOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
        data, labels = batch[b"data"], batch[b"labels"]
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path.name}: not a CIFAR-10 python batch ({type(exc).__name__})") from None
    try:
        data, labels = np.asarray(data, dtype=np.uint8), np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{path.name}: expected N x 3072 uint8 data and N integer labels") from None
    if (
        data.ndim != 2
        or data.shape[1] != 3072
        or labels.shape != (len(data),)
        or not np.all((labels >= 0) & (labels < 10))
    ):
        raise DataError(f"{path.name}: expected N x 3072 uint8 data and N labels in 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    if raw.size == 0 or raw.size % 3073:
        raise DataError(f"{path.name}: not a CIFAR-10 binary batch (size is not a multiple of 3073)")
    rows = raw.reshape(-1, 3073)
    return rows[:, 1:].reshape(-1, 3, 32, 32), rows[:, 0].astype(np.int64)


@DATASETS.register("cifar10")
def _cifar10(data_dir: str | Path | None = None) -> Dataset:
    root = Path(data_dir) if data_dir is not None else None
    binary = root is not None and (root / "data_batch_1.bin").is_file()
    suffix, reader = (".bin", _cifar_binary_batch) if binary else ("", _cifar_python_batch)
    names = [f"data_batch_{i}{suffix}" for i in range(1, 6)] + [f"test_batch{suffix}"]
    paths = _require(data_dir, "cifar10", [[n] for n in names])
    parts = [reader(p) for p in paths]
    x_tr = np.concatenate([p[0] for p in parts[:5]]).astype(np.float32) / 255.0
    y_tr = np.concatenate([p[1] for p in parts[:5]])
    x_te, y_te = parts[5][0].astype(np.float32) / 255.0, parts[5][1]
    return _as_dataset("cifar10", x_tr, y_tr, x_te, y_te, 10)
