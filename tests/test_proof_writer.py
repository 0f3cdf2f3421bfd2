"""The proof writer streams checkpoints: the bytes it writes and hashes are exactly ``safetensors.torch.save``'s."""

from __future__ import annotations

import torch
from safetensors.torch import save

from trustgrad.config import RunConfig
from trustgrad.models import build_model
from trustgrad.proof.commit import file_digest
from trustgrad.proof.format import capture_state, checkpoint_name
from trustgrad.proof.writer import DirectWriter, FileImage, ProofWriter, safetensors_pieces
from trustgrad.replica import Replica, make_optimizer


def _joined(state: dict[str, torch.Tensor]) -> bytes:
    return b"".join(bytes(piece) for piece in safetensors_pieces(state))


def test_streamed_checkpoint_bytes_equal_safetensors_save_for_every_dtype_and_shape():
    # every dtype the proof reader accepts and two it does not, scalars, an empty tensor, names out of order
    state = {
        "z": torch.zeros(3, dtype=torch.float64), "a": torch.ones(2, 2, dtype=torch.bfloat16),
        "m": torch.tensor(3, dtype=torch.int64), "e": torch.zeros(0), "b": torch.tensor([True, False]),
        "h": torch.ones(3, dtype=torch.float16), "i": torch.arange(5, dtype=torch.int32),
        "u": torch.arange(7, dtype=torch.uint8), "s": torch.tensor(2.5), "k": torch.arange(2, dtype=torch.int8),
        "q": torch.arange(2, dtype=torch.int16), "t": torch.arange(6.0).reshape(2, 3).t(),  # not contiguous
    }  # fmt: skip
    assert _joined(state) == save({k: v.contiguous() for k, v in state.items()})


def test_a_written_checkpoint_is_the_saved_state_and_its_digest(tmp_path):
    cfg = RunConfig().replace(model={"name": "cnn-bn"})
    model = build_model("cnn-bn", (3, 32, 32), 10, 0, cfg.model)
    replica = Replica(model, make_optimizer(model, 0.1, momentum=0.9))
    replica.compute_gradients(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    replica.step()  # momentum buffers, BatchNorm statistics and the step counter are all in the state
    state = capture_state(replica.model, replica.optimizer)
    writer = ProofWriter(tmp_path / "proof")
    writer.add_checkpoint(3, state)
    written = (tmp_path / "proof" / checkpoint_name(3)).read_bytes()
    assert written == save(state)
    assert writer.digests[3] == file_digest(written)


def test_a_snapshot_into_an_earlier_one_reuses_its_memory_and_equals_a_fresh_one():
    cfg = RunConfig().replace(model={"name": "cnn-bn"})
    model = build_model("cnn-bn", (3, 32, 32), 10, 0, cfg.model)
    replica = Replica(model, make_optimizer(model, 0.1, momentum=0.9))
    first = capture_state(replica.model, replica.optimizer)  # step 0: no momentum buffers yet
    kept = {k: v.data_ptr() for k, v in first.items() if k.startswith("model/")}
    for _ in range(2):
        replica.compute_gradients(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
        replica.step()
    reused = capture_state(replica.model, replica.optimizer, into=first)
    fresh = capture_state(replica.model, replica.optimizer)
    assert reused.keys() == fresh.keys() and any(k.startswith("momentum/") for k in reused)
    assert all(torch.equal(reused[k], fresh[k]) for k in fresh)
    assert all(reused[k].data_ptr() == ptr for k, ptr in kept.items())  # written in place, not cloned
    assert save(reused) == save(fresh)


def test_direct_and_buffered_writes_give_the_same_file_and_digest_at_every_block_boundary(tmp_path):
    # lengths around the staging buffer and the block size: the padded tail must be truncated away exactly
    small = DirectWriter.BLOCK
    sizes = [0, 1, small - 9, small, small + 1, DirectWriter.STAGE // 4 - 3, DirectWriter.STAGE // 4 + 5]
    for i, n in enumerate(sizes):
        state = {"w": torch.arange(n, dtype=torch.float32), "b": torch.ones(3, dtype=torch.float64)}
        direct, buffered = ProofWriter(tmp_path / f"d{i}"), ProofWriter(tmp_path / f"b{i}", direct=False)
        direct.add_checkpoint(5, state)
        buffered.add_checkpoint(5, state)
        written = (tmp_path / f"d{i}" / checkpoint_name(5)).read_bytes()
        assert written == (tmp_path / f"b{i}" / checkpoint_name(5)).read_bytes() == save(state)
        assert direct.digests[5] == buffered.digests[5] == file_digest(written)
        assert direct._direct is not None and direct._direct.files == 1  # not a silent fall-back to the page cache


def test_a_checkpoint_larger_than_the_staging_buffer_is_written_whole(tmp_path):
    state = {"w": torch.randn(DirectWriter.STAGE // 4 * 2 + 1234)}  # two full stages and a tail
    writer = ProofWriter(tmp_path / "proof")
    writer.add_checkpoint(0, state)
    written = (tmp_path / "proof" / checkpoint_name(0)).read_bytes()
    assert written == save(state) and writer.digests[0] == file_digest(written)


def test_a_snapshot_taken_into_a_file_image_is_written_from_it_as_safetensors_save_would(tmp_path):
    cfg = RunConfig().replace(model={"name": "cnn-bn"})
    model = build_model("cnn-bn", (3, 32, 32), 10, 0, cfg.model)
    replica = Replica(model, make_optimizer(model, 0.1, momentum=0.9))
    replica.compute_gradients(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    replica.step()
    image = FileImage.like(capture_state(replica.model, replica.optimizer))
    writer = ProofWriter(tmp_path / "proof")
    for step in (5, 10):  # the second snapshot overwrites the first in the same image
        replica.compute_gradients(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
        replica.step()
        state = capture_state(replica.model, replica.optimizer, into=image.tensors)
        assert image.holds(state)
        writer.add_checkpoint(step, state, image)
        written = (tmp_path / "proof" / checkpoint_name(step)).read_bytes()
        assert written == save(capture_state(replica.model, replica.optimizer))
        assert writer.digests[step] == file_digest(written)
    assert writer._direct is not None and writer._direct.files == 2
    # a state that is not the image's own tensors is written from its pieces, never from the image
    other = capture_state(replica.model, replica.optimizer)
    assert not image.holds(other)
    writer.add_checkpoint(15, other, image)
    assert (tmp_path / "proof" / checkpoint_name(15)).read_bytes() == save(other)


def test_a_recorded_run_writes_every_checkpoint_after_the_first_from_its_file_image(tmp_path):
    # the prover's path end to end: snapshots into reused file images, written directly, and the proof verifies
    from trustgrad.proof import VerifyOptions, verify
    from trustgrad.run import run

    cfg = RunConfig().replace(
        workers=1, max_steps=12, epochs=1, progress=False, out=str(tmp_path), proof={"mode": "record", "k": 5}
    )
    summary = run(cfg).summary
    assert summary["proof_checkpoints"] == 4  # steps 0, 5, 10, 12
    assert summary["proof_checkpoints_from_image"] == 3  # checkpoint 0 has no momentum yet: a fresh copy
    assert verify(tmp_path / "proof", VerifyOptions(threads=1)).valid
