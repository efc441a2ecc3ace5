"""The `distpg` command as a user runs it: a real subprocess, a real local Ray, a real run folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distpg.cli import main
from distpg.config import load_run_config
from distpg.metrics import CONTRACT_METRICS
from distpg.orchestrator import ended_run

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parent.parent

SMALL = ["--set", "run.steps=6", "--set", "run.checkpoint_every=3", "--set", "task.length=4",
         "--set", "task.alphabet=abcd", "--set", "task.num_eval=16", "--set", "rollout.prompts_per_step=8",
         "--set", "rollout.group_size=4", "--set", "log.print_every=2", "--set", "log.sample_every=3"]


def distpg(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    return subprocess.run([sys.executable, "-m", "distpg", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_resume_of_an_ended_run_has_nothing_to_do_until_its_config_asks_for_more(tmp_path):
    run = tmp_path / "run"
    # stop_reward 0: the mean of the last 5 steps reaches it at step 5, before run.steps=6
    p = distpg("train", *SMALL, "--set", "run.stop_reward=0.0", "--set", "run.keep_checkpoints=5",
               "--run-dir", str(run))
    assert p.returncode == 0 and "stopping at step 5" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # every checkpoint carries the stop_reward window, so a resumed run stops where the original did
    window = json.loads((run / "checkpoints" / "step_000003" / "state.json").read_text())["recent_rewards"]
    assert window == [r["rollout/reward_mean"] for r in records[:3]]

    p = distpg("train", "--resume", str(run))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "nothing to resume: the run ended at step 5" in p.stdout and "Traceback" not in p.stderr
    assert f"final reward {records[-1]['rollout/reward_mean']:.3f}" in p.stdout
    assert "done after" not in p.stdout  # one closing line, not a second one claiming a run
    assert (run / "metrics.jsonl").read_text().count("\n") == 5  # untouched
    # once its config no longer stops it, a resume has training left (the cluster's job test trains on so)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["run"]["stop_reward"] = None
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert ended_run(load_run_config(run / "config.yaml"), run) is None
    cfg["run"]["steps"] = 5  # and a run that reached its (lowered) run.steps has none
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    p = distpg("train", "--resume", str(run))
    assert p.returncode == 0 and "nothing to resume: the run ended at step 5 (run.steps=5)" in p.stdout


# ~11 s (20 s on AMD): a local runtime; the default run stops runs on failing rewards in test_rewards
@pytest.mark.slow
def test_failing_reward_function_exits_nonzero_with_one_paragraph(tmp_path):
    """A reward function that always fails stops the run at its first step, clearly: exit status 1, one paragraph
    naming the failed rollout and the function's own error, no traceback, and how to start it over."""
    # one rollout worker: one actor fewer to start (its share fails as each of two would)
    p = distpg("train", *SMALL, "--set", "task.name=tests.user_task:always_fails", "--set", "rollout.num_workers=1",
               "--run-dir", str(tmp_path / "r"))
    assert p.returncode == 1
    assert "distpg: training failed: rollout of step 1 failed: RewardError" in p.stderr
    assert "RuntimeError: reward service unavailable" in p.stderr  # the function's own error, named
    assert "Traceback" not in p.stderr
    # nothing was logged: the folder is removed, as for a run stopped before its first step, so the same command
    # can be run again once the function is fixed (its empty metrics.jsonl had a second try refused)
    assert p.stdout.rstrip().endswith(f"removed the run folder {tmp_path / 'r'}: the run failed before its first step")
    assert p.stderr.rstrip().endswith("no run folder was kept") and not (tmp_path / "r").exists()


def test_an_empty_run_dir_and_a_run_folder_as_config_are_refused_saying_what_to_give(tmp_path, capsys):
    from distpg.cli import main

    assert main(["train", "--run-dir", ""]) == 2  # took runs/TASK-TIME, unsaid
    assert "--run-dir '': give a folder, or leave --run-dir out for runs/TASK-TIME" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("")
    assert main(["train", str(tmp_path)]) == 2  # "Is a directory"
    assert f"config file {str(tmp_path)!r} is a folder (a run folder: continue it with distpg train --resume FOLDER)" \
        in capsys.readouterr().err


def test_a_run_folder_that_cannot_be_made_is_one_line_naming_it(tmp_path):
    """A --run-dir under a file (or on a read-only disk) was an OSError's traceback from the run folder's lock."""
    (tmp_path / "afile").write_text("")
    p = distpg("train", "--run-dir", str(tmp_path / "afile" / "r"), timeout=60)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr == f"distpg: error: Not a directory: {str(tmp_path / 'afile' / 'r')!r} (errno 20)\n"


def test_bad_config_exits_2_without_starting_ray(tmp_path):
    p = distpg("train", "--set", "rollout.num_workers=3", "--set", "ray.num_cpus=2", "--set", "algo.max_staleness=3",
               "--run-dir", str(tmp_path / "r"), timeout=60)
    assert p.returncode == 2
    assert "rollout.num_workers=3 workers" in p.stderr and "the Ray cluster has 2" in p.stderr
    # a setting this run never uses is said first (config.inert_settings)
    assert p.stdout.startswith("distpg: note: algo.max_staleness=3 has no effect: it applies only with "
                               "run.mode=async (here run.mode=sync)\n")
    assert "Traceback" not in p.stderr and not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, message", [
    (["eval", "run", "--temperature", "-1"], "argument --temperature: '-1': must be at least 0"),
    (["eval", "run", "--samples", "-1"], "argument --samples: '-1': must be at least 0"),
    (["eval", "run", "--temperature", "nan"], "argument --temperature: 'nan': must be a finite number"),
    (["eval", "run", "--temperature", "inf"], "argument --temperature: 'inf': must be a finite number"),
    (["eval", "run", "--seed", "99999999999999999999999"],  # torch's OverflowError, after loading the policy
     "argument --seed: '99999999999999999999999': must be at most 18446744073709551615"),
    (["eval", "run", "--seed", "-1"], "argument --seed: '-1': must be at least 0"),
    (["doctor", "--timeout", "nan"], "argument --timeout: 'nan': must be a finite number"),
    (["bench", "weights", "--workers", "0"], "argument --workers: '0': every entry must be at least 1"),
    (["bench", "sampler", "--threads", "0"], "argument --threads: '0': must be at least 1"),
    (["bench", "sampler", "--json", "/nonexistent/dir/b.json"], "--json '/nonexistent/dir/b.json': no folder"),
    (["scale", "--warmup", "-1"], "argument --warmup: '-1': must be at least 0"),
    (["scale", "--cpus-per-worker", "0"], "argument --cpus-per-worker: '0': must be above 0"),
    (["train", "BINARY"], "is not UTF-8 text"),
    (["train", "--run-dir", "FILE"], "is a file; give a folder"),
])
def test_bad_command_line_values_exit_2_naming_the_option(tmp_path, capsys, args, message):
    """In this process (argparse exits 2 itself; distpg's own checks return 2), before any run starts."""
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe bad")
    (tmp_path / "file").write_text("mine")
    args = [{"BINARY": str(tmp_path / "bin.yaml"), "FILE": str(tmp_path / "file")}.get(a, a) for a in args]
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    stderr = capsys.readouterr().err
    assert code == 2 and message in stderr, stderr[-2000:]
    assert "Traceback" not in stderr and (tmp_path / "file").read_text() == "mine"


def readmes_task_in(folder: Path) -> tuple[Path, dict]:
    """The README's `mytasks.py`, as written there, put in `folder`: (the installed `distpg` command, an
    environment without PYTHONPATH or RAY_ADDRESS). Skips the test where the command is not installed."""
    readme = (ROOT / "README.md").read_text()
    (folder / "mytasks.py").write_text(readme.split("```python\n# mytasks.py\n", 1)[1].split("```", 1)[0])
    command = Path(sys.executable).parent / "distpg"
    if not command.exists():
        pytest.skip("the distpg command is not installed next to this Python")
    return command, {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}


def test_train_then_eval_of_the_readmes_own_task_from_its_folder_without_pythonpath(tmp_path, monkeypatch,
                                                                                    capsys):
    """The README's `mytasks.py`, as written there, in the current folder: `distpg train` (the installed
    command, not `python -m`) finds it with no PYTHONPATH, on the driver and on the Ray workers, and
    `distpg eval` too. The run writes the run folder a user reads: progress lines, the resolved config, metrics,
    TensorBoard, rollouts, checkpoints, and eval prints its samples."""
    command, env = readmes_task_in(tmp_path)
    p = subprocess.run([str(command), "train", "--set", "task.name=mytasks:make", *SMALL, "--run-dir", "run"],
                       capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "run"
    # progress lines with step, reward, steps/s and ETA
    progress = [line for line in p.stdout.splitlines() if line.startswith("step ")]
    assert len(progress) == 3 and "steps/s" in progress[0] and "ETA" in progress[0] and "reward" in progress[0]
    assert "step     6/6" in progress[-1]

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["task"]["length"] == 4 and cfg["model"]["n_layer"] == 2  # resolved, with the --set values

    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(set(CONTRACT_METRICS) <= set(r) for r in records)
    assert records[-1]["time_s"] > records[0]["time_s"] > 0

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "rollout/reward_mean" in tags["scalars"] and "perf/sync_s" in tags["scalars"]
    assert [e.step for e in acc.Scalars("rollout/reward_mean")] == list(range(1, 7))
    assert acc.Scalars("rollout/reward_mean")[-1].value == pytest.approx(records[-1]["rollout/reward_mean"])
    assert "samples/text_summary" in tags["tensors"]  # sample completions as text, of as many prompts as they can
    text = acc.Tensors("samples/text_summary")[0].tensor_proto.string_val[0].decode()
    shown = [line.split("`")[1] for line in text.split("\n\n")]
    assert len(shown) == 4 and len(set(shown)) == 4, text

    table = pq.read_table(run / "rollouts")
    assert table.num_rows == 6 * 8 * 4
    assert set(table.column("step").to_pylist()) == set(range(1, 7))

    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000006"
    for name in ("model.safetensors", "optimizer.pt", "state.json"):
        assert (run / "checkpoints" / "step_000003" / name).exists()

    # the run folder from another folder: its module is found where it started (from the run's own folder, by a
    # relative path: `distpg eval run | head` below)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    p = subprocess.run([str(command), "eval", str(run), "--samples", "3"], capture_output=True, text=True, env=env,
                       timeout=300, cwd=elsewhere)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "held-out prompts: 16 | reward_mean" in p.stdout
    assert len([x for x in p.stdout.splitlines() if "-> " in x and "target" in x]) == 3
    # what a stop now keeps (a resume that stops before its first step, or a stop after step 7 unlogged) ...
    from distpg.checkpoint import resume_hint

    metrics = run / "metrics.jsonl"
    logged = metrics.read_text()
    assert "checkpoint is step 6, the last step done: nothing is lost" in resume_hint(run, 7)
    metrics.write_text(logged + '{"step": 7, "rollout/rew')  # a record cut off by a kill
    assert "nothing is lost" in resume_hint(run, 7)
    metrics.write_text(logged + '{"step": 7}\n')
    assert "the steps after the latest checkpoint (step 6) are lost" in resume_hint(run, 7)
    metrics.write_text(logged)
    # (in this process: an argument check, made before the run is read)
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["export", "run", "notes.txt"]) == 2
    assert "OUT='notes.txt' is a file" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ~10 s (18 s on a 2-core AMD EPYC): two runs' local runtimes of its own; the test above trains and evaluates
@pytest.mark.slow
def test_a_run_or_eval_read_by_head_stops_at_its_next_line_with_the_resume_hint(tmp_path):
    """Resumed as `distpg train | head` reads it (or a pager quit), a run stops at its next line of output with the
    resume hint and no traceback, as a pipe's writer does; the Ray workers find the run's own task module where it
    started; `distpg eval | head` ends quietly."""
    command, env = readmes_task_in(tmp_path)
    run = tmp_path / "run"
    p = subprocess.run([str(command), "train", "--set", "task.name=mytasks:make", *SMALL, "--set", "run.steps=2",
                        "--run-dir", "run"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # resumed (run.steps raised), read as `distpg train --resume RUN | head` reads it: the Ray
    # workers find the module where the run started too, and once the reader is gone the run stops at its next
    # line of output, as a pipe's writer does, with the resume hint instead of a traceback
    config = run / "config.yaml"
    assert config.read_text().count("\n  steps: 2\n") == 1
    config.write_text(config.read_text().replace("\n  steps: 2\n", "\n  steps: 400\n"))
    p = subprocess.Popen([str(command), "train", "--resume", str(run)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, cwd=elsewhere)
    for line in p.stdout:  # as `head` reads up to a step line, then exits
        if line.startswith("step     4/"):  # log.print_every=2: the resumed run's first step line
            break
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=120) == 141, err[-3000:]
    assert "Traceback" not in err and "BrokenPipeError" not in err
    assert "distpg: stopped: its standard output was closed (broken pipe); " in err
    assert err.rstrip().endswith(f"continue with: distpg train --resume {run}")
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs][:4] == list(range(1, 5)) and len(recs) < 400
    # `distpg eval | head` ends quietly
    e = subprocess.Popen([str(command), "eval", "run", "--samples", "16"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    e.stdout.readline()  # its header is flushed first; if the rest was buffered already, the exit's flush fails
    e.stdout.close()
    err = e.stderr.read()
    assert e.wait(timeout=120) in (0, 141) and "Traceback" not in err and "Exception ignored" not in err, err


def test_a_job_in_rays_copy_of_its_working_dir_needs_an_absolute_run_dir(tmp_path, monkeypatch, capsys):
    """As a `ray job submit` entrypoint, the current folder is Ray's temporary copy of the working dir: the
    default runs/ or a relative --run-dir would land there, and a relative path the copy lacks is explained."""
    from distpg.cli import main

    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    for run_dir in ([], ["--run-dir", "runs/x"]):
        assert main(["train", *run_dir]) == 2
        err = capsys.readouterr().err
        assert f"this job runs in Ray's temporary copy of its working dir ({copy})" in err
        assert "pass --run-dir with an absolute path on the head" in err
    assert not (copy / "runs").exists()
    assert main(["train", "--run-dir", str(tmp_path / "r"), "--set", "model.init_from=runs/tiny-gpt2"]) == 2
    err = capsys.readouterr().err
    assert "model.init_from='runs/tiny-gpt2'" in err and "give such a path as an absolute path on the head" in err
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")  # not a job: a relative run folder is fine, no note
    assert main(["train", "--run-dir", "r", "--set", "model.init_from=runs/tiny-gpt2"]) == 2
    assert "absolute path on the head" not in capsys.readouterr().err


def test_a_run_stopped_before_its_first_step_offers_no_resume_of_the_folder_it_removed(tmp_path, monkeypatch, capsys):
    # SIGTERM before the first step removes the new run's folder (said "the run failed before its first step"
    # until session 27: a user's own stop is no failure), and the last line then told the user to continue with
    # `distpg train --resume` of that folder
    import distpg.orchestrator

    def sigterm():
        raise KeyboardInterrupt("SIGTERM")

    monkeypatch.setattr(distpg.orchestrator, "init_ray", lambda cfg, address: False)  # no runtime needed
    monkeypatch.setattr(distpg.orchestrator, "signals_interrupt", sigterm)  # the signal lands as it is set
    run = tmp_path / "run"
    assert main(["train", *SMALL, "--run-dir", str(run)]) == 143
    captured = capsys.readouterr()
    assert f"removed the run folder {run}: the run was stopped before its first step" in captured.out
    assert not run.exists()
    assert "--resume" not in captured.err and "stopped by SIGTERM; no run folder was kept" in captured.err, captured.err
