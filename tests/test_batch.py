import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distpg.batch import SCHEMA, BatchError, RolloutWriter, make_batch, to_learner_batch, validate


def columns(n=3, **changes):
    cols = {
        "prompt_id": [7] * n,
        "sample_idx": list(range(n)),
        "worker_id": [1] * n,
        "policy_version": [4] * n,
        "prompt_tokens": [[2, 3, 4]] * n,
        "completion_tokens": [[5, 6], [5], [6, 6, 1]][:n],
        "completion_logprobs": [[-0.5, -0.25], [-1.0], [-0.1, -0.2, -0.3]][:n],
        "completion_policy_logprobs": [[-0.7, -0.25], [-1.5], [-0.1, -0.4, -0.3]][:n],
        "reward": [1.0, 0.5, 0.0][:n],
        "reward_ok": [True, True, False][:n],
        "truncated": [False, False, True][:n],
        "prompt_text": ["abc"] * n,
        "completion_text": ["de", "d", "ee"][:n],
    }
    cols.update(changes)
    return cols


def test_parquet_round_trip(tmp_path):
    batch = make_batch(columns())
    assert batch.schema.equals(SCHEMA)
    pq.write_table(pa.Table.from_batches([batch]), tmp_path / "b.parquet")
    back = pq.read_table(tmp_path / "b.parquet")
    assert back.schema.equals(SCHEMA)
    assert back.to_pylist() == pa.Table.from_batches([batch]).to_pylist()
    assert back.column("completion_tokens").to_pylist()[2] == [6, 6, 1]


def test_to_learner_batch_pads_and_aligns():
    b = to_learner_batch([make_batch(columns())], pad_id=0)
    # row 0: prompt 2 3 4, completion 5 6 -> tokens 2 3 4 5 6 0; response at columns 3, 4
    assert b.tokens.tolist() == [[2, 3, 4, 5, 6, 0], [2, 3, 4, 5, 0, 0], [2, 3, 4, 6, 6, 1]]
    assert b.response_mask.tolist()[0] == [False, False, False, True, True, False]
    assert b.response_mask.tolist()[2] == [False, False, False, True, True, True]
    assert torch.allclose(b.old_logprobs[0], torch.tensor([0, 0, 0, -0.5, -0.25, 0]))
    assert torch.allclose(b.policy_logprobs[2], torch.tensor([0, 0, 0, -0.1, -0.4, -0.3]))
    assert b.rewards.tolist() == [1.0, 0.5, 0.0] and b.ok.tolist() == [True, True, False]
    assert b.policy_version.tolist() == [4, 4, 4]


def test_two_batches_concatenate():
    a, c = make_batch(columns()), make_batch(columns(2, prompt_id=[9, 9], prompt_tokens=[[2]] * 2))
    b = to_learner_batch([a, c], pad_id=0)
    assert b.tokens.shape == (5, 6) and b.prompt_id.tolist() == [7, 7, 7, 9, 9]
    assert b.tokens[3].tolist() == [2, 5, 6, 0, 0, 0]


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda c: c.update(completion_tokens=[[5, 99], [5], [6, 6, 1]]), "completion_tokens has token id 99, outside"),
        (lambda c: c.update(prompt_tokens=[[-1], [2], [2]]), "prompt_tokens has token id -1"),
        (lambda c: c.update(completion_logprobs=[[-0.5], [-1.0], [-0.1, -0.2, -0.3]]), "differ in length"),
        (lambda c: c.update(completion_logprobs=[[-0.5, float("nan")], [-1.0], [-0.1, -0.2, -0.3]]), "not finite"),
        (lambda c: c.update(completion_logprobs=[[-0.5, 0.7], [-1.0], [-0.1, -0.2, -0.3]]), "not finite"),
        (lambda c: c.update(completion_policy_logprobs=[[-0.5], [-1.0], [-0.1, -0.2, -0.3]]),
         "completion_policy_logprobs and completion_tokens differ in length"),
        (lambda c: c.update(completion_policy_logprobs=[[-0.5, float("inf")], [-1.0], [-0.1, -0.2, -0.3]]),
         "completion_policy_logprobs has values that are not finite"),
        (lambda c: c.update(reward=[float("inf"), 0.5, 0.0]), "reward is not finite where reward_ok"),
        (lambda c: c.update(prompt_tokens=[[], [2], [2]]), "empty prompt"),
    ],
)
def test_validate_rejects_with_field_name(mutate, fragment):
    cols = columns()
    mutate(cols)
    with pytest.raises(BatchError) as e:
        validate(make_batch(cols), vocab_size=10)
    assert fragment in str(e.value)


def test_validate_schema_errors():
    good = make_batch(columns())
    validate(good, vocab_size=10)
    with pytest.raises(BatchError, match="field 'reward' is missing"):
        validate(good.drop_columns(["reward"]), vocab_size=10)
    wrong = good.set_column(good.schema.get_field_index("reward"), "reward",
                            pa.array([1.0, 0.5, 0.0], type=pa.float64()))
    with pytest.raises(BatchError, match="field 'reward' has type double, expected float"):
        validate(wrong, vocab_size=10)
    with pytest.raises(BatchError, match="empty"):
        validate(good.slice(0, 0), vocab_size=10)
    with pytest.raises(BatchError, match="expected a pyarrow.RecordBatch"):
        validate({"reward": [1.0]}, vocab_size=10)
    nan_but_masked = make_batch(columns(reward=[1.0, 0.5, float("nan")]))
    validate(nan_but_masked, vocab_size=10)  # a failed reward may be anything


def test_rollout_writer_files_are_complete_and_named_by_steps(tmp_path):
    w = RolloutWriter(tmp_path, flush_every=2)
    for step in (1, 2, 3):  # as a worker returns them: with its call's timings as schema metadata
        w.add(step, [make_batch(columns()).replace_schema_metadata({"gen_s": str(0.01 * step)})])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["steps_000001-000002.parquet"]  # step 3 is still buffered
    w.flush()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["steps_000001-000002.parquet", "steps_000003-000003.parquet"]
    t = pq.read_table(tmp_path)
    assert t.num_rows == 9 and sorted(set(t.column("step").to_pylist())) == [1, 2, 3]
    assert t.schema.metadata is None  # one batch's timings are not the file's
    assert np.allclose(t.column("reward").to_numpy()[:3], [1.0, 0.5, 0.0])


def test_a_flush_after_an_add_interrupted_midway_names_the_steps_it_holds(tmp_path, monkeypatch):
    """A SIGTERM is raised in the driver as KeyboardInterrupt wherever it lands: in `add`, after a batch was
    buffered and before the step counters were set, the run's last flush failed (formatting None) and the
    run ended with a TypeError instead of its message; the file is named by the steps it holds."""
    w = RolloutWriter(tmp_path, flush_every=10)
    full, calls = np.full, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second batch of the step
            raise KeyboardInterrupt("SIGTERM")
        return full(*args, **kwargs)

    monkeypatch.setattr(np, "full", interrupted)
    with pytest.raises(KeyboardInterrupt):
        w.add(5, [make_batch(columns()), make_batch(columns(2))])
    monkeypatch.setattr(np, "full", full)
    w.flush()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["steps_000005-000005.parquet"]
    assert pq.read_table(tmp_path).column("step").to_pylist() == [5, 5, 5]  # the batch it had buffered


def test_rollout_files_of_the_same_samples_are_byte_identical(tmp_path):
    # the workers' timings (sync_s, gen_s, reward_s in each batch's schema metadata) went into every file's
    # schema, so two runs of the same config and seed wrote the same rows into files that differed
    files = []
    for run, gen_s in (("a", "0.0152"), ("b", "0.0371")):
        w = RolloutWriter(tmp_path / run, flush_every=2)
        for step in (1, 2):
            w.add(step, [make_batch(columns()).replace_schema_metadata({"gen_s": gen_s, "sync_s": "0.001"})])
        files.append((tmp_path / run / "steps_000001-000002.parquet").read_bytes())
    assert files[0] == files[1]
    assert pq.read_schema(tmp_path / "a" / "steps_000001-000002.parquet").metadata is None
