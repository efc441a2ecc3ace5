"""RUN_DIR/metrics.jsonl across an interruption: what `--resume` keeps of it, and what it appends."""

import json

import pytest

from distpg import checkpoint
from distpg.config import ConfigError, dump_run_config
from distpg.learner import Learner
from distpg.metrics import read_records
from distpg.orchestrator import ended_run, prepare_run_dir
from tests.conftest import small_config


def record(step, time_s):
    return {"step": step, "time_s": time_s, "rollout/reward_mean": 0.1 * step, "learner/loss": None}


def write_run(run_dir, lines, checkpoint_step):
    cfg = small_config("run.steps=6")
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_run_config(cfg))  # as `distpg train` leaves it
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    checkpoint.save(run_dir, checkpoint_step, Learner(cfg).state(), 3, {"recent_rewards": []})
    return cfg


def test_resume_drops_a_last_line_cut_off_by_a_kill(tmp_path):
    # killed while writing step 4's line (after the checkpoint of step 2): `distpg plot` says --resume mends
    # it, and --resume must not stop on it with a JSONDecodeError traceback
    run = tmp_path / "run"
    good = [json.dumps(record(s, float(s))) for s in (1, 2, 3)]
    cfg = write_run(run, [*good, '{"step": 4, "time_s": 4.0, "rollout/rew'], checkpoint_step=2)
    assert [r["step"] for r in read_records(run / "metrics.jsonl")] == [1, 2, 3]
    assert ended_run(cfg, run) is None  # 2 of 6 steps: there is training left
    assert ended_run(small_config("run.steps=2"), run)["final_reward"] == pytest.approx(0.2)
    assert prepare_run_dir(cfg, run, resume=True) == 2
    assert (run / "metrics.jsonl").read_text() == "".join(line + "\n" for line in good[:2])  # as written


def test_a_line_that_is_not_json_before_the_last_is_named(tmp_path):
    run = tmp_path / "run"
    cfg = write_run(run, [json.dumps(record(1, 1.0)), "garbage", json.dumps(record(2, 2.0))], checkpoint_step=1)
    with pytest.raises(ConfigError, match=r"metrics.jsonl' line 2 is not a JSON record"):
        prepare_run_dir(cfg, run, resume=True)


def test_time_s_of_a_resumed_run_goes_on_from_its_checkpoint(tmp_path):
    # distpg plot draws reward against time_s: a resumed run's time_s started from 0 again, and its curve
    # ran back to the left
    import io

    from distpg.metrics import MetricsLogger

    run = tmp_path / "run"
    cfg = write_run(run, [json.dumps(record(s, 500.0 * s)) for s in (1, 2, 3)], checkpoint_step=2)
    assert prepare_run_dir(cfg, run, resume=True) == 2
    out = io.StringIO()
    logger = MetricsLogger(run, total_steps=4, tensorboard=False, print_every=1, start_step=2, stream=out)
    metrics = {"rollout/reward_mean": 0.3, "rollout/reward_std": 0.0, "rollout/length_mean": 4.0,
               "learner/loss": 0.0, "perf/rollout_s": 0.0, "perf/learn_s": 0.0, "perf/sync_s": 0.0}
    logger.log(3, metrics)
    logger.close()
    times = [r["time_s"] for r in read_records(run / "metrics.jsonl")]
    assert times[:2] == [500.0, 1000.0] and 1000.0 <= times[2] < 1000.0 + 600
    # the progress line's rate is over this attempt's steps and seconds, not over the offset
    assert "| 0.00 steps/s" not in out.getvalue()


def test_a_new_run_starts_its_time_at_0(tmp_path):
    import io

    from distpg.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, total_steps=10, tensorboard=False, print_every=100, stream=io.StringIO())
    logger.log(1, {"x": 0.0})
    logger.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["time_s"] < 10.0


@pytest.mark.parametrize("stop_reward, max_time_s, eta", [(None, None, "ETA 0m18s"), (0.97, None, "ETA ≤ 0m18s"),
                                                          (None, 5.0, "ETA 0m03s"), (0.97, 60.0, "ETA ≤ 0m18s")])
def test_the_eta_is_a_bound_where_the_run_may_stop_sooner(tmp_path, monkeypatch, stop_reward, max_time_s, eta):
    """The ETA counts to run.steps at this attempt's rate; with run.stop_reward it is an upper bound (the default
    config's run stops near step 150 of 400, and its ETA read as if it ran all 400), and run.max_time_s caps it."""
    import io

    from distpg import metrics

    clock = [1000.0]
    monkeypatch.setattr(metrics.time, "time", lambda: clock[0])
    out = io.StringIO()
    logger = metrics.MetricsLogger(tmp_path, total_steps=10, tensorboard=False, print_every=1, stream=out,
                                   stop_reward=stop_reward, max_time_s=max_time_s)
    clock[0] += 2.0  # one step in 2 s: 9 steps left take 18 s
    logger.log(1, {"rollout/reward_mean": 0.3, "rollout/reward_std": 0.0, "rollout/length_mean": 4.0,
                   "learner/loss": 0.0, "perf/rollout_s": 0.0, "perf/learn_s": 0.0, "perf/sync_s": 0.0})
    logger.close()
    assert out.getvalue().rstrip().endswith(f"| {eta}"), out.getvalue()


def test_the_rate_and_eta_follow_the_last_steps_not_the_whole_attempt(tmp_path, monkeypatch):
    """A run slowed for a while (a helper's node outage on a cluster) showed 1.04 steps/s and an ETA of minutes
    for the ~45 s it had left: both were over the whole attempt. They are over the last RATE_WINDOW steps."""
    import io

    from distpg import metrics

    clock = [0.0]
    monkeypatch.setattr(metrics.time, "time", lambda: clock[0])
    out = io.StringIO()
    logger = metrics.MetricsLogger(tmp_path, total_steps=100, tensorboard=False, print_every=70, stream=out)
    row = {"rollout/reward_mean": 0.3, "rollout/reward_std": 0.0, "rollout/length_mean": 4.0, "learner/loss": 0.0,
           "perf/rollout_s": 0.0, "perf/learn_s": 0.0, "perf/sync_s": 0.0}
    for step in range(1, 71):  # 10 steps of 10 s (the outage), then 60 of 0.1 s
        clock[0] += 10.0 if step <= 10 else 0.1
        logger.log(step, row)
    logger.close()
    assert metrics.RATE_WINDOW < 60
    line = out.getvalue().strip()
    assert "| 10.00 steps/s |" in line and line.endswith("| ETA 0m03s"), line  # 30 steps left at 10 steps/s
