import dataclasses
import pickle

import numpy as np
import pytest
import torch

from distpg.model import ModelShape, build_model
from distpg.weights import FlatParams, WeightsError

SHAPE = ModelShape(vocab_size=11, n_layer=2, n_head=2, n_embd=16, n_positions=16)


def test_parameters_are_views_of_one_buffer():
    model = build_model(SHAPE, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flat = FlatParams(model)
    assert flat.flat.numel() == sum(p.numel() for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # rebinding kept the values
    flat.flat.zero_()
    assert all(bool((p == 0).all()) for p in model.parameters())  # and the parameters share its storage


def test_pack_load_round_trip_through_pickle_and_readonly_buffer():
    src, dst = build_model(SHAPE, seed=0), build_model(SHAPE, seed=1)
    fs, fd = FlatParams(src), FlatParams(dst)
    msg = pickle.loads(pickle.dumps(fs.pack(version=5), protocol=5))
    msg.buffer.setflags(write=False)  # as the object store hands it out
    fd.load(msg)
    for (n, a), (_, b) in zip(src.named_parameters(), dst.named_parameters()):
        assert torch.equal(a, b), n
    x = torch.randint(0, 11, (2, 5))
    assert torch.equal(src(x), dst(x))


def test_optimizer_step_on_views_moves_the_packed_weights():
    model = build_model(SHAPE, seed=0)
    flat = FlatParams(model)
    before = flat.pack(0).buffer.copy()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randint(0, 11, (2, 5))).sum().backward()
    opt.step()
    after = flat.pack(1).buffer
    assert not np.array_equal(before, after)


def test_checksum_and_manifest_are_checked():
    fs, fd = FlatParams(build_model(SHAPE, seed=0)), FlatParams(build_model(SHAPE, seed=1))
    msg = fs.pack(3)
    corrupted = dataclasses.replace(msg, buffer=msg.buffer.copy())
    corrupted.buffer[10] += 1.0
    with pytest.raises(WeightsError, match="v3: checksum mismatch"):
        fd.load(corrupted)
    other = FlatParams(build_model(dataclasses.replace(SHAPE, n_embd=32), seed=0))
    with pytest.raises(WeightsError, match="do not fit this model"):
        fd.load(other.pack(3))


def _buffer_of(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_shared_load_views_the_message_buffer_without_a_copy():
    src, dst, ref = build_model(SHAPE, seed=0), build_model(SHAPE, seed=1), build_model(SHAPE, seed=1)
    fs, fd, fr = FlatParams(src), FlatParams(dst), FlatParams(ref)
    msg = pickle.loads(pickle.dumps(fs.pack(version=2), protocol=5))
    msg.buffer.setflags(write=False)  # as the object store hands it out
    fd.load(msg, share=True)
    fr.load(msg)  # the copying load
    assert fd.held is msg
    start = msg.buffer.ctypes.data
    for p in dst.parameters():  # every parameter lives inside the message's buffer
        assert start <= p.data_ptr() < start + msg.nbytes
    x = torch.randint(0, 11, (2, 5))
    assert torch.equal(dst(x), src(x)) and torch.equal(dst(x), ref(x))

    # the next copying load gives the parameters their own buffer again and leaves the message alone
    before = msg.buffer.copy()
    fd.load(fs.pack(version=3))
    assert fd.held is None and np.array_equal(msg.buffer, before)
    for p in dst.parameters():
        assert _buffer_of(p) == _buffer_of(fd.flat) != msg.buffer.ctypes.data


def test_every_load_checks_manifest_and_size_and_the_checksum_when_asked():
    fs, fd = FlatParams(build_model(SHAPE, seed=0)), FlatParams(build_model(SHAPE, seed=1))
    msg = fs.pack(4)
    corrupted = dataclasses.replace(msg, buffer=msg.buffer.copy())
    corrupted.buffer[-1] += 1.0
    for share in (False, True):
        with pytest.raises(WeightsError, match="v4: checksum mismatch"):
            fd.load(corrupted, verify=True, share=share)
        fd.load(corrupted, verify=False, share=share)  # not re-read: the caller vouches for the bytes
        other = FlatParams(build_model(dataclasses.replace(SHAPE, n_embd=32), seed=0)).pack(4)
        with pytest.raises(WeightsError, match="do not fit this model"):
            fd.load(other, verify=False, share=share)
        short = dataclasses.replace(msg, buffer=msg.buffer[:-1])
        with pytest.raises(WeightsError, match="this model needs"):
            fd.load(short, verify=False, share=share)


def test_checksum_is_reread_unless_packed_on_this_node():
    from distpg.weights import packed_elsewhere, this_node

    msg = FlatParams(build_model(SHAPE, seed=0)).pack(1)
    assert msg.node == this_node()  # stamped by pack: None outside Ray, the node id inside
    assert packed_elsewhere(dataclasses.replace(msg, node=None))  # packed outside Ray: re-read
    assert packed_elsewhere(dataclasses.replace(msg, node="another node"))
    assert packed_elsewhere(msg) == (this_node() is None)
