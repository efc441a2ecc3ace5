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


def test_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    """`latest` naming a folder deleted by hand (or cut short) had a resume start the run over from step 0, its
    logs cut, with complete checkpoints beside it: the newest complete one is taken instead."""
    state = learner_state()
    for step in (2, 4, 6):
        checkpoint.save(tmp_path, step, state, keep=3)
    root = tmp_path / "checkpoints"
    assert checkpoint.latest(tmp_path) == root / "step_000006"
    os.remove(root / "step_000006" / "optimizer.pt")  # incomplete
    assert checkpoint.latest(tmp_path) == root / "step_000004"
    (root / "latest").write_text("step_000009\n")  # names none
    assert checkpoint.latest(tmp_path) == root / "step_000004" and checkpoint.named_latest(tmp_path) == "step_000009"
    os.remove(root / "latest")
    assert checkpoint.latest(tmp_path) == root / "step_000004" and checkpoint.named_latest(tmp_path) is None


@pytest.mark.parametrize("name, damage, error", [
    ("state.json", lambda p: p.write_text("{bad"), "JSONDecodeError"),
    ("state.json", lambda p: p.write_text("{}"), "KeyError: 'step'"),
    ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100]), "SafetensorError"),
    ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:-100]), "SafetensorError"),
    ("optimizer.pt", lambda p: p.write_bytes(p.read_bytes()[:-100]), "BadZipFile"),
    ("optimizer.pt", lambda p: p.write_bytes(b""), "BadZipFile"),
])
def test_a_damaged_checkpoint_file_is_named_without_reading_the_tensors(tmp_path, name, damage, error):
    path = checkpoint.save(tmp_path, 3, learner_state(), keep=3)
    checkpoint.check(path)  # whole: nothing to say
    damage(path / name)
    with pytest.raises(checkpoint.CheckpointError, match=rf"step_000003' is damaged: {name} cannot be read \({error}"):
        checkpoint.check(path)


def test_a_checkpoint_of_another_model_shape_is_named_before_loading(tmp_path):
    from distpg.model import ModelShape, policy_shape, tensor_shapes

    path = checkpoint.save(tmp_path, 3, learner_state(), keep=3)
    cfg = small_config()
    held = tensor_shapes(policy_shape(cfg.model, Learner(cfg).vocab_size))
    checkpoint.check(path, held)
    wider = tensor_shapes(ModelShape(vocab_size=Learner(cfg).vocab_size, n_layer=cfg.model.n_layer,
                                     n_head=cfg.model.n_head, n_embd=2 * cfg.model.n_embd,
                                     n_positions=cfg.model.n_positions))
    n = cfg.model.n_embd
    with pytest.raises(checkpoint.CheckpointError, match=rf"holds a policy of another shape than the run's config "
                                                         rf"describes: h.0.attn.c_attn.bias \({3 * n},\) there, "
                                                         rf"\({6 * n},\) by the config, "):
        checkpoint.check(path, wider)


def run_with_checkpoints(tmp_path, steps=(2, 4), logged=5):
    """A run folder as `distpg train` leaves it, without Ray: config, provenance, checkpoints of `steps` of the
    default config's learner, metrics of steps 1..`logged`."""
    import json

    from distpg.config import load_config
    from distpg.orchestrator import prepare_run_dir

    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config()
    prepare_run_dir(cfg, run, resume=False)
    state = Learner(cfg).state()
    for step in steps:
        state["version"] = step
        checkpoint.save(run, step, state, keep=3)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": k, "time_s": k}) + "\n"
                                               for k in range(1, logged + 1)))
    return cfg, run


def test_a_resume_whose_latest_checkpoint_is_gone_continues_from_the_newest_complete_one(tmp_path, capsys):
    from distpg.orchestrator import prepare_run_dir

    cfg, run = run_with_checkpoints(tmp_path)
    import shutil

    shutil.rmtree(run / "checkpoints" / "step_000004")
    assert prepare_run_dir(cfg, run, resume=True) == 2  # not 0, with the run's logs cut to nothing
    assert f"{run / 'checkpoints' / 'latest'} names step_000004, which is missing or incomplete; resuming from " \
           "step_000002, the newest complete checkpoint" in capsys.readouterr().out
    assert [line for line in (run / "metrics.jsonl").read_text().splitlines()] == [
        '{"step": 1, "time_s": 1}', '{"step": 2, "time_s": 2}']


@pytest.mark.parametrize("fault", ["damaged", "reshaped"])
def test_a_resume_of_a_damaged_or_reshaped_checkpoint_is_refused_before_ray_starts_changing_nothing(tmp_path, fault):
    """A cut model.safetensors, or a config.yaml whose model was edited, surfaced as a traceback (or a resume
    hint naming the same failing command) from the learner's actor after Ray had started, and the failed start
    had added to provenance.jsonl: now exit 2 before Ray, naming the file or the tensors, the folder untouched."""
    import subprocess
    import sys

    from distpg.orchestrator import PROVENANCE

    _, run = run_with_checkpoints(tmp_path)
    if fault == "damaged":
        weights = run / "checkpoints" / "step_000004" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-64])
        said = f"checkpoint '{run / 'checkpoints' / 'step_000004'}' is damaged: model.safetensors cannot be read"
    else:
        text = (run / "config.yaml").read_text()
        assert text.count("n_embd: 64") == 1
        (run / "config.yaml").write_text(text.replace("n_embd: 64", "n_embd: 128"))
        said = "holds a policy of another shape than the run's config describes: "
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.run([sys.executable, "-m", "distpg", "train", "--resume", str(run)], capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith(f"distpg: error: {said}" if fault == "damaged" else
                                                     "distpg: error: checkpoint "), p.stderr
    assert said in p.stderr and "Traceback" not in p.stderr and "Ray" not in p.stdout
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # metrics, provenance as found
    assert (run / PROVENANCE).exists()
