import os
import pickle

import pytest
import torch

from distpg import checkpoint
from distpg.learner import Learner
from tests.conftest import small_config


def learner_state(seed=0):
    return Learner(small_config(f"run.seed={seed}")).state()


def test_save_load_round_trip(tmp_path):
    state = learner_state()
    state["version"], state["ema"] = 7, 0.25
    path = checkpoint.save(tmp_path, 7, state, keep=3)
    assert path.name == "step_000007" and checkpoint.latest(tmp_path) == path
    loaded, run_state = checkpoint.load(path)
    assert run_state["step"] == 7 and loaded["version"] == 7 and loaded["ema"] == 0.25
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v)
    # a learner loaded from it has the same parameters and version
    other = Learner(small_config("run.seed=5"))
    other.load_state(loaded)
    assert other.version == 7
    for (n, a), b in zip(other.model.named_parameters(), state["model"].values()):
        assert torch.equal(a, b), n


def test_retention_keeps_the_newest(tmp_path):
    state = learner_state()
    for step in range(1, 6):
        checkpoint.save(tmp_path, step, state, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_000004", "step_000005"]
    assert checkpoint.latest(tmp_path).name == "step_000005"


def test_a_half_written_checkpoint_is_never_latest(tmp_path):
    state = learner_state()
    checkpoint.save(tmp_path, 1, state, keep=3)
    # a crash mid-write leaves a temporary folder behind, and `latest` untouched
    junk = tmp_path / "checkpoints" / ".tmp-step_000002-999"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"partial")
    assert checkpoint.latest(tmp_path).name == "step_000001"
    checkpoint.load(checkpoint.latest(tmp_path))


def test_incomplete_checkpoint_is_refused(tmp_path):
    path = checkpoint.save(tmp_path, 1, learner_state(), keep=3)
    os.remove(path / "optimizer.pt")
    with pytest.raises(checkpoint.CheckpointError, match="optimizer.pt is missing"):
        checkpoint.load(path)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_payload_in_optimizer_file_is_refused(tmp_path):
    path = checkpoint.save(tmp_path, 1, learner_state(), keep=3)
    with open(path / "optimizer.pt", "wb") as f:
        pickle.dump({"state": Payload()}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        checkpoint.load(path)


def test_checkpoint_files_get_the_umask_mode_not_safetensors_0600(tmp_path):
    old = os.umask(0o022)
    try:
        path = checkpoint.save(tmp_path, 1, learner_state(), keep=3)
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in path.iterdir()}
    assert modes["model.safetensors"] == modes["state.json"] == 0o644, modes


def test_the_resume_hint_of_a_ray_job_names_the_submission(tmp_path, monkeypatch):
    """A job's log is read where it was submitted, and its driver ran in Ray's copy of the working dir on the
    head: its hint names `cluster/submit.sh --resume` (a helper, stopping a job with `ray job stop`, was told
    `distpg train --resume`, which runs the driver where it is typed). Anywhere else, `distpg train --resume`."""
    cfg = small_config("run.steps=9")
    run = tmp_path / "run"
    checkpoint.save(run, 3, Learner(cfg).state(), 3, {"recent_rewards": []})
    (run / "metrics.jsonl").write_text("".join(f'{{"step": {s}}}\n' for s in range(1, 6)))
    assert checkpoint.resume_hint(run, 9).endswith(f"(step 3) are lost; continue with: distpg train --resume {run}")
    job_copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    job_copy.mkdir(parents=True)
    monkeypatch.chdir(job_copy)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # as Ray sets it for a job's entrypoint
    assert checkpoint.resume_hint(run, 9).endswith(f"continue with: cluster/submit.sh --resume {run}")
    assert checkpoint.resume_hint(tmp_path / "fresh", 9) == "no run folder was kept"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert checkpoint.resume_hint(empty, 9) == ("no checkpoint was written yet (run.checkpoint_every): "
                                                f"cluster/submit.sh --resume {empty} starts it over from step 0")
