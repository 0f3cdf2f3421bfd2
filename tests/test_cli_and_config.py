"""Bad input never produces a traceback: one line on stderr, exit code 2 (docs/architecture.md §4)."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from trustgrad.cli import main
from trustgrad.config import RunConfig, config_from_dict, config_to_dict
from trustgrad.data import load_dataset, shard_indices
from trustgrad.errors import ConfigError, DataError


def _fails_cleanly(capsys, argv, *needles):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["train", "--pattern", "nope"], ["unknown pattern 'nope'", "allreduce", "ring"]),
        (["train", "--dataset", "nope"], ["unknown dataset 'nope'", "digits"]),
        (["train", "--model", "nope"], ["unknown model 'nope'", "mlp"]),
        (["train", "--workers", "0"], ["workers must be >= 1"]),
        (["train", "--workers", "two"], ["invalid int value"]),
        (["train", "--dataset", "mnist", "--data-dir", "/nonexistent"], ["train-images-idx3-ubyte"]),
        (["train", "--dataset", "cifar10"], ["--data-dir"]),
        (["train", "--lr", "-1"], ["lr must be > 0 and <= 1000"]),
        (["train", "--lr", "inf"], ["argument --lr", "invalid finite number"]),
        (["train", "--timeout", "nan"], ["argument --timeout", "invalid finite number"]),
        (["train", "--server-threads", "0"], ["server_threads must be >= 1"]),
        (["bench", "nope"], ["unknown benchmark 'nope'"]),
    ],
)
def test_bad_cli_input_is_one_line_exit_2(capsys, argv, needles):
    _fails_cleanly(capsys, argv, *needles)


def test_toml_unknown_key_and_wrong_type(tmp_path, capsys):
    bad_key = tmp_path / "a.toml"
    bad_key.write_text('workers = 2\n[pattern]\nnmae = "ring"\n')
    _fails_cleanly(capsys, ["train", "--config", str(bad_key)], "unknown config key 'pattern.nmae'")
    bad_type = tmp_path / "b.toml"
    bad_type.write_text('workers = "four"\n')
    _fails_cleanly(capsys, ["train", "--config", str(bad_type)], "'workers' must be int")
    not_toml = tmp_path / "c.toml"
    not_toml.write_text("workers = = 2\n")
    _fails_cleanly(capsys, ["train", "--config", str(not_toml)], "not valid TOML")
    _fails_cleanly(capsys, ["train", "--config", str(tmp_path / "missing.toml")], "does not exist")
    _fails_cleanly(capsys, ["train", "--config", str(tmp_path)], "cannot be read")


def test_toml_and_flags_layer(tmp_path):
    from trustgrad.cli import build_parser
    from trustgrad.cli.train import config_from_args

    path = tmp_path / "run.toml"
    path.write_text('workers = 3\nlr = 1\n[pattern]\nname = "ring"\n')
    args = build_parser().parse_args(["train", "--config", str(path), "--workers", "2"])
    cfg = config_from_args(args)
    assert (cfg.workers, cfg.lr, cfg.pattern.name) == (2, 1.0, "ring")


def test_config_round_trips_through_dicts():
    cfg = RunConfig(workers=3, malicious=("rank=1,attack=noise",)).replace(pattern={"split_points": [1, 3]})
    assert config_from_dict(config_to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="must be a list"):
        config_from_dict({"malicious": "rank=1"})
    with pytest.raises(ConfigError, match="must be bool"):
        config_from_dict({"progress": 1})


def test_shards_are_disjoint_equal_and_deterministic():
    shards = [shard_indices(1437, w, 4, seed=3) for w in range(4)]
    assert {len(s) for s in shards} == {359}
    assert len(np.unique(np.concatenate(shards))) == 4 * 359
    assert np.array_equal(shards[1], shard_indices(1437, 1, 4, seed=3))
    assert not np.array_equal(shards[1], shard_indices(1437, 1, 4, seed=4))


def test_embedded_datasets_have_fixed_splits():
    digits = load_dataset("digits")
    assert digits.input_shape == (1, 8, 8) and len(digits.x_test) == 360
    assert float(digits.x_train.max()) <= 1.0
    cancer = load_dataset("breast-cancer")
    assert cancer.input_shape == (30,) and cancer.num_classes == 2
    syn = load_dataset("synthetic")
    assert syn.input_shape == (64,) and len(syn.x_train) + len(syn.x_test) == 4096


def _idx(path, array, gz=False):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def test_mnist_idx_files_are_read_from_a_folder(tmp_path):
    rng = np.random.default_rng(0)
    _idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (20, 28, 28)), gz=True)
    _idx(tmp_path / "train-labels-idx1-ubyte", rng.integers(0, 10, 20))
    _idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (5, 28, 28)))
    _idx(tmp_path / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 5))
    ds = load_dataset("mnist", data_dir=tmp_path)
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.x_test.shape == (5, 1, 28, 28)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")
    with pytest.raises(DataError, match="header says"):
        load_dataset("mnist", data_dir=tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00")
    with pytest.raises(DataError, match="truncated idx header"):
        load_dataset("mnist", data_dir=tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="not a readable gzip file"):
        load_dataset("mnist", data_dir=tmp_path)


def test_cifar_binary_batches_and_refusal_of_foreign_pickles(tmp_path):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        rows = np.concatenate([rng.integers(0, 10, (4, 1)), rng.integers(0, 256, (4, 3072))], axis=1)
        (tmp_path / name).write_bytes(rows.astype(np.uint8).tobytes())
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.input_shape == (3, 32, 32)

    import pickle

    evil = tmp_path / "evil"
    evil.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (evil / name).write_bytes(pickle.dumps({b"data": __import__("os").system, b"labels": []}))
    with pytest.raises(DataError, match="refusing to load"):
        load_dataset("cifar10", data_dir=evil)
