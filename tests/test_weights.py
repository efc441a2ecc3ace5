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
