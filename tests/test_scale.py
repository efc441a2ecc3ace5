"""`distpg scale`: the sweep it plans, the figures it derives from metrics records (worked by hand), its
outputs, and a real sweep on plain local Ray. (On a 3-node cluster: test_cluster.py.)"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distpg.config import ConfigError
from distpg.scale import (
    Point,
    Skipped,
    add_efficiency,
    best,
    format_table,
    node_resources_of,
    plan_points,
    summarise,
    write_outputs,
)
from tests.conftest import small_config

ROOT = Path(__file__).resolve().parent.parent


def test_weak_scaling_plan_grows_the_batch_and_pins_workers_to_the_first_k_nodes():
    names = ["distpg_node_0", "distpg_node_1", "distpg_node_2"]
    plan = plan_points(small_config(), [1, 2, 3], [1, 2], names, prompts_per_worker=4, cpus_per_worker=1.0)
    assert [(n, k) for n, k, _ in plan] == [(1, 1), (2, 1), (3, 1), (2, 2), (3, 2)]  # no N < k
    for n, k, cfg in plan:
        assert cfg.rollout.num_workers == n and cfg.rollout.prompts_per_step == 4 * n
        assert cfg.rollout.node_resource == names[:k] and cfg.rollout.num_cpus_per_worker == 1.0
        assert cfg.run.mode == "sync" and cfg.run.stop_reward is None and not cfg.log.rollouts
        assert cfg.ray.placement_strategy == ("SPREAD" if k > 1 else "PACK")
    strong = plan_points(small_config(), [1, 2], [None], [], prompts_per_worker=None, cpus_per_worker=0.5)
    assert [cfg.rollout.prompts_per_step for _, _, cfg in strong] == [4, 4]  # the config's, split N ways
    assert all(cfg.rollout.node_resource is None for _, _, cfg in strong)


def test_node_counts_to_sweep():
    from distpg.scale import _node_counts

    three = ["distpg_node_0", "distpg_node_1", "distpg_node_2"]
    assert _node_counts("auto", three) == [1, 2, 3] and _node_counts("auto", three[:1]) == [None]
    assert _node_counts("none", three) == [None] and _node_counts("2,1,2", three) == [1, 2]
    with pytest.raises(ConfigError, match="--nodes 4: the cluster has 3 nodes with distpg_node_I"):
        _node_counts("4", three)


def test_node_resources_are_found_and_ordered_by_index():
    nodes = [{"CPU": 2, "distpg_node_10": 1}, {"CPU": 2, "distpg_node_2": 1, "gpu_pool": 1}, {"CPU": 1}]
    assert node_resources_of(nodes) == ["distpg_node_2", "distpg_node_10"]


def record(rollout_s, tokens, step_s, learn_s, sync_s, nodes=1):
    return {"perf/rollout_s": rollout_s, "perf/rollout_tokens_per_s": tokens / rollout_s, "perf/step_s": step_s,
            "perf/learn_s": learn_s, "perf/sync_s": sync_s, "workers/nodes": nodes}


def test_summary_sums_over_steps_before_dividing():
    cfg = small_config("rollout.num_workers=2")  # 4 prompts x 4 samples = 16 trajectories per step
    p = summarise([record(0.1, 100, 0.2, 0.08, 0.02), record(0.3, 500, 0.4, 0.08, 0.02, nodes=2)], cfg, nodes=2)
    # 600 tokens in 0.4 s of rollout; 32 trajectories in 0.4 s of rollout and in 0.6 s of whole steps
    assert p.rollout_tokens_per_s == pytest.approx(1500)
    assert p.trajectories_per_s == pytest.approx(80) and p.train_trajectories_per_s == pytest.approx(32 / 0.6)
    assert (p.step_s, p.rollout_s, p.learn_s, p.sync_s) == pytest.approx((0.3, 0.2, 0.08, 0.02))
    assert (p.workers, p.nodes, p.nodes_used, p.measured_steps, p.trajectories_per_step) == (2, 2, 2, 2, 16)
    with pytest.raises(ConfigError, match="no measured steps"):
        summarise([], cfg, None)


def point(workers, tokens_per_s, nodes=None):
    return Point(workers, nodes, 1, 4, 16, 2, tokens_per_s, 1.0, 1.0, 0.1, 0.05, 0.04, 0.01)


def test_efficiency_is_throughput_over_n_times_the_one_worker_point():
    pts = [point(1, 1000), point(2, 1800), point(4, 2000)]
    assert add_efficiency(pts) is pts[0]
    assert [p.efficiency for p in pts] == pytest.approx([1.0, 0.9, 0.5])  # 1800/2000, 2000/4000
    pts = [point(2, 1800), point(4, 2000)]  # no one-worker point: against the smallest, E(2) = 1
    add_efficiency(pts)
    assert [p.efficiency for p in pts] == pytest.approx([1.0, 2000 * 2 / (4 * 1800)])


def test_points_that_do_not_fit_the_cluster_are_skipped_with_the_reason():
    from distpg.scale import split_by_fit

    names = ["distpg_node_0", "distpg_node_1"]
    nodes = [{"CPU": 2.0, name: 1.0} for name in names]  # two 2-CPU nodes; the learner takes 1 CPU, G = 4
    plan = plan_points(small_config(), [1, 3], [1, 2], names, 4, 1.0)
    fitting, skipped = split_by_fit(plan, 4, 0, nodes)
    assert [(n, k) for n, k, _ in fitting] == [(1, 1), (3, 2)]
    assert [(s.workers, s.nodes, s.prompts_per_step, s.trajectories_per_step) for s in skipped] == [(3, 1, 12, 48)]
    assert skipped[0].skipped.startswith("does not fit the cluster: ") and "distpg_node_0" in skipped[0].skipped


def test_the_fastest_try_of_a_point_counts_and_all_are_kept():
    tries = [point(2, 1500), point(2, 1800), point(2, 900)]
    top = best(tries)
    assert top is tries[1] and top.tries_tokens_per_s == [1500, 1800, 900]


def test_outputs_csv_json_png_and_table(tmp_path):
    pts = [point(1, 1000, 1), point(2, 1800, 1), point(2, 1700, 2)]
    add_efficiency(pts)
    # a point that did not fit the cluster is in both files, saying so (it was printed, then left out of them)
    skipped = Skipped(4, 1, 16, 128, "does not fit the cluster: only 3 workers fit")
    files = write_outputs([*pts[:2], skipped, pts[2]], tmp_path, {"where": "test", "machine": "test machine"})
    assert [f.name for f in files] == ["scaling.csv", "scaling.json", "scaling.png"]
    rows = list(csv.DictReader(open(tmp_path / "scaling.csv")))
    assert [(r["workers"], r["nodes"], r["efficiency"], r["skipped"]) for r in rows] == [
        ("1", "1", "1.0", ""), ("2", "1", "0.9", ""), ("4", "1", "", skipped.skipped), ("2", "2", "0.85", "")]
    assert rows[2]["rollout_tokens_per_s"] == rows[2]["run_dir"] == "" and rows[2]["trajectories_per_step"] == "128"
    data = json.loads((tmp_path / "scaling.json").read_text())
    assert data["machine"] == "test machine" and len(data["points"]) == 4
    assert data["points"][2]["skipped"] == skipped.skipped and data["points"][2]["rollout_tokens_per_s"] is None
    assert data["points"][0]["skipped"] is None and data["points"][0]["rollout_tokens_per_s"] == 1000
    assert (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"  # drawn from the measured points
    table = format_table(pts).splitlines()
    assert "tokens/s" in table[0] and "efficiency" in table[0] and table[2].split()[-1] == "0.90"


@pytest.mark.ray
@pytest.mark.slow  # ~20 s each; test_cluster's sweep runs the command end to end in the default run
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_scale_on_plain_local_ray(tmp_path, mode):
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    sets = ["task.length=4", f"run.mode={mode}"]
    p = subprocess.run([sys.executable, "-m", "distpg", "scale", "--workers", "1,2", "--steps", "3", "--warmup", "1",
                        "--prompts-per-worker", "4", *(x for s in sets for x in ("--set", s)), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "efficiency" in p.stdout and "wrote " in p.stdout and f"{mode} mode" in p.stdout
    basis = "of the rollout phase" if mode == "sync" else "of the run (async: the phases overlap)"
    assert f"tokens/s, traj/s: per second {basis}; train traj/s: per second of the run" in p.stdout
    data = json.loads((tmp_path / "scaling.json").read_text())
    assert data["where"].startswith("local Ray") and data["scaling"] == "weak" and data["mode"] == mode
    assert data["sweep"] == {"workers": [1, 2], "nodes": "auto", "cpus_per_worker": 1.0, "prompts_per_worker": 4,
                             "repeats": 1, "set": sets, "config_file": None}
    pts = data["points"]
    assert [(pt["workers"], pt["nodes"], pt["measured_steps"]) for pt in pts] == [(1, None, 2), (2, None, 2)]
    # efficiency is T(2) / (2 T(1)) of the recorded throughputs; its size is timing, which the test does not judge
    assert pts[0]["efficiency"] == 1.0 and pts[1]["efficiency"] > 0
    assert pts[1]["efficiency"] == pytest.approx(pts[1]["rollout_tokens_per_s"] / (2 * pts[0]["rollout_tokens_per_s"]))
    assert [pt["trajectories_per_step"] for pt in pts] == [4 * 8, 8 * 8]  # weak scaling: 4 prompts per worker
    for pt in pts:  # each point is a real run folder, in the sweep's mode, whose measured steps give its figures
        records = [json.loads(x) for x in (Path(pt["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert len(records) == 3 and f"mode: {mode}" in (Path(pt["run_dir"]) / "config.yaml").read_text()
        tokens = sum(r["perf/rollout_tokens_per_s"] * r["perf/rollout_s"] for r in records[1:])
        seconds = sum(r["perf/step_s" if mode == "async" else "perf/rollout_s"] for r in records[1:])
        assert pt["rollout_tokens_per_s"] == pytest.approx(tokens / seconds)


def test_scale_rejects_a_sweep_that_measures_nothing(tmp_path, capsys, monkeypatch):
    """By `cli.main` in this process, as test_cli's bad command lines (argparse exits 2 itself; distpg's own checks
    return 2), before any run starts: two interpreters and torch imports fewer than `distpg scale` processes."""
    from distpg.cli import main

    def exit_status(args):
        try:
            return main(args)
        except SystemExit as e:
            return e.code

    monkeypatch.chdir(ROOT)
    assert exit_status(["scale", "--steps", "2", "--warmup", "2", "--out", str(tmp_path)]) == 2
    assert "--steps 2 must exceed --warmup 2" in capsys.readouterr().err
    assert exit_status(["scale", "--workers", "1,x"]) == 2
    assert "argument --workers: '1,x': expected comma-separated whole numbers" in capsys.readouterr().err


def test_scale_nodes_option_is_checked_before_ray_starts(capsys):
    from distpg.cli import build_parser

    assert scale_args("--nodes", "3,1").nodes == "3,1" and scale_args().nodes == "auto"
    for bad in ("0", "x", "1,,-2"):  # were refused only once Ray had started (10+ s)
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(["scale", "--nodes", bad])
        assert e.value.code == 2
        assert f"argument --nodes: '{bad}'" in capsys.readouterr().err


def test_outputs_without_matplotlib_are_the_csv_and_json_and_say_how_to_get_the_plot(tmp_path, monkeypatch, capsys):
    pts = [point(1, 1000, 1), point(2, 1800, 1)]
    add_efficiency(pts)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    files = write_outputs(pts, tmp_path, {"where": "test", "machine": "test machine"})
    assert [f.name for f in files] == ["scaling.csv", "scaling.json"]
    assert len(list(csv.DictReader(open(tmp_path / "scaling.csv")))) == 2 and not (tmp_path / "scaling.png").exists()
    assert "pip install 'distpg[plot]'" in capsys.readouterr().out


def scale_args(*argv):
    from distpg.cli import build_parser

    return build_parser().parse_args(["scale", *argv])


@pytest.mark.parametrize("item, hint", [
    ("rollout.num_cpus_per_worker=2", "--cpus-per-worker"),
    ("rollout.num_workers=3", "--workers"),
    ("rollout.node_resource=[distpg_node_1]", "--nodes"),
    ("run.steps=50", "--steps"),
    ("rollout.prompts_per_step=8", "--strong"),
])
def test_scale_refuses_a_set_of_a_field_the_sweep_sets_before_ray_starts(item, hint, tmp_path):
    from distpg.scale import main

    # each of these was replaced by the sweep's own value without a word (an async --set measured sync runs);
    # the small sweep keeps a regression short
    with pytest.raises(ConfigError, match=rf"--set '{item.replace('[', '.').replace(']', '.')}'.*{hint}"):
        main(scale_args("--set", item, "--workers", "1", "--steps", "2", "--warmup", "1", "--out", str(tmp_path)))
    assert not any(tmp_path.iterdir())


def test_scale_keeps_other_sets_the_strong_batch_and_the_configs_mode(tmp_path):
    from distpg.scale import check_overrides, plan_points

    check_overrides(["task.length=4", "model.preset=small", "run.mode=async"], strong=False)
    check_overrides(["rollout.prompts_per_step=8"], strong=True)  # --strong splits the config's batch
    for mode in ("sync", "async"):  # every point runs in the config's mode (it was sync whatever the config said)
        plan = plan_points(small_config(f"run.mode={mode}"), [1, 2], [None], [], 4, 1.0)
        assert [cfg.run.mode for _, _, cfg in plan] == [mode, mode]


def test_async_throughput_is_per_second_of_the_run():
    """In async mode a step's rollout overlaps the learning of earlier steps: tokens/s and trajectories/s are
    per second of whole steps (the sum of perf/step_s), not of the overlapping rollout phases."""
    cfg = small_config("rollout.num_workers=2", "run.mode=async")  # 16 trajectories per step
    p = summarise([record(0.1, 100, 0.2, 0.08, 0.02), record(0.3, 500, 0.4, 0.08, 0.02)], cfg, nodes=None)
    # 600 tokens and 32 trajectories in 0.6 s of whole steps (their rollouts took 0.4 s, overlapping)
    assert p.rollout_tokens_per_s == pytest.approx(1000)
    assert p.trajectories_per_s == pytest.approx(32 / 0.6) == p.train_trajectories_per_s


def test_scaling_json_records_the_options_each_point_ran_with():
    from distpg.scale import sweep_settings

    # the recorded config is the base one (rollout.num_cpus_per_worker 0.5 by default), not what the points ran
    args = scale_args("--workers", "4,1", "--cpus-per-worker", "0.5", "--strong", "--repeats", "2", "--set",
                      "task.length=4")
    assert sweep_settings(args) == {"workers": [1, 4], "nodes": "auto", "cpus_per_worker": 0.5,
                                    "prompts_per_worker": None, "repeats": 2, "set": ["task.length=4"],
                                    "config_file": None}


@pytest.mark.ray
@pytest.mark.slow  # two real runs, ~12 s
def test_a_failed_point_stops_the_sweep_and_keeps_the_points_before_it(ray_session, tmp_path):
    from distpg.orchestrator import TrainingError
    from distpg.scale import _raise_stop, sweep

    common = ["rollout.num_workers=1", "rollout.num_cpus_per_worker=0.5", "run.steps=2", "log.tensorboard=false",
              "log.rollouts=false", "run.checkpoint_every=100"]
    good = small_config(*common)
    # a worker that cannot return its share in a millisecond, with no restart allowed: a real failed run
    bad = small_config(*common, "rollout.timeout_s=0.001", "rollout.max_restarts=0")
    tries, stop = sweep([(1, None, good), (2, None, bad), (3, None, good)], 1, 1, tmp_path)
    assert list(tries) == [(1, None)] and tries[(1, None)][0].measured_steps == 1  # the third never ran
    label, run_dir, e = stop
    assert (label, run_dir) == ("2 worker(s)", tmp_path / "runs" / "w2") and isinstance(e, TrainingError)
    assert not (tmp_path / "runs" / "w3").exists()
    with pytest.raises(TrainingError, match=r"the sweep stopped at 2 worker\(s\): .*rollout.max_restarts=0.*"
                                            r"runs/w2, console output in train.log there\); kept"):
        _raise_stop(stop, "kept")


def test_scale_refuses_an_out_folder_with_an_earlier_sweep_before_ray_starts(tmp_path):
    from distpg.scale import main

    (tmp_path / "runs" / "w1").mkdir(parents=True)  # an earlier sweep's run folder: train refused it after Ray started
    (tmp_path / "runs" / "w1" / "config.yaml").write_text("run: {}\n")
    with pytest.raises(ConfigError, match=r"--out '.*' already holds a sweep \(runs\); give a new or empty folder"):
        main(scale_args("--workers", "1", "--steps", "2", "--warmup", "1", "--out", str(tmp_path)))
    (tmp_path / "notes.txt").write_text("mine")  # anything else in the folder is fine; a file is not a folder
    with pytest.raises(ConfigError, match=r"--out '.*notes.txt' is a file"):
        main(scale_args("--workers", "1", "--steps", "2", "--warmup", "1", "--out", str(tmp_path / "notes.txt")))
    run = tmp_path / "a_run"  # a training run's folder: its scaling.* files would have gone in beside its own
    run.mkdir()
    (run / "config.yaml").write_text("run: {}\n")
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"--out '.*a_run' is a training run's folder; give a new or empty folder"):
        main(scale_args("--workers", "1", "--steps", "2", "--warmup", "1", "--out", str(run)))


def test_a_local_sweep_past_the_machines_memory_or_far_past_its_cores_is_warned_about():
    """--workers 100 on 2 cores started 101 processes of ~400 MB without a word (a helper stopped it at 60 s)."""
    from distpg.scale import ACTOR_BYTES, crowded

    gib = 2**30
    assert crowded(100, 2, 23 * gib).startswith(
        f"--workers 100: the largest point starts 101 processes of about {ACTOR_BYTES >> 20} MB each, 39.5 GiB, more "
        "than the 23.0 GiB this machine has available: lower --workers")
    assert crowded(20, 2, 23 * gib) == ("--workers 20: the largest point runs 20 rollout workers on 2 cores, 10 per "
                                        "core: its figures measure the cores' sharing more than distpg")
    assert crowded(16, 2, 23 * gib) is None and crowded(16, 2, None) is None  # 8 per core, 6.6 GiB: nothing said


def test_a_lost_head_during_a_sweep_says_which_point_ran_and_which_runs_were_done(monkeypatch, tmp_path):
    """The lost-head message (orchestrator.watch_gcs) of a sweep's run said `distpg train --resume` that run's folder,
    which a sweep cannot use. Each point's run is handed what to say instead: the point, the runs done before it,
    and to run the sweep again. (`measure` here only reads what its run would print: the real head-loss run is
    test_cluster.py's.)"""
    from distpg import scale

    said = []
    record = {"perf/rollout_s": 1.0, "perf/step_s": 2.0, "perf/rollout_tokens_per_s": 10.0, "workers/nodes": 1,
              "perf/learn_s": 1.0, "perf/sync_s": 0.0}

    def measure(cfg, run_dir, warmup, nodes, head_lost=None):
        said.append(head_lost())
        return summarise([record], cfg, nodes, str(run_dir))

    monkeypatch.setattr(scale, "measure", measure)
    points = [(1, None, small_config()), (2, 2, small_config("rollout.num_workers=2"))]
    tries, stop = scale.sweep(points, 2, 0, tmp_path)
    assert stop is None and len(said) == 4
    runs = tmp_path / "runs"
    assert said[0] == (f"the sweep (distpg scale) was measuring 1 worker(s), run folder {runs / 'w1-r0'}; no run of "
                       "the sweep was done before it, but no scaling.* was written. Run the sweep again, with a new "
                       f"--out ({tmp_path} holds this one's runs)")
    assert said[3].startswith(f"the sweep (distpg scale) was measuring 2 worker(s) on 2 node(s), run folder "
                              f"{runs / 'n2-w2-r1'}; the runs done before it (w1-r0, n2-w2-r0, w1-r1) are in {runs}, "
                              "each with its metrics.jsonl, but no scaling.* was written")
    assert not any("--resume" in s for s in said)


@pytest.mark.ray
def test_a_sweep_no_point_of_which_fits_says_why(tmp_path):
    """Every point skipped under STRICT_SPREAD on one node: the error said "lower --workers or --cpus-per-worker",
    which would not help (a helper's trial); it now gives the first point's own reason."""
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, "-m", "distpg", "scale", "--workers", "1,2", "--steps", "3", "--warmup", "1",
                        "--set", "ray.placement_strategy=STRICT_SPREAD", "--out", str(tmp_path / "s")],
                       capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    assert p.returncode == 2, p.stdout[-3000:] + p.stderr[-3000:]
    assert ("distpg: error: no point of the sweep fits the cluster; 1 worker(s): does not fit the cluster: "
            "ray.placement_strategy=STRICT_SPREAD puts each of the learner and 1 rollout worker actor(s) on a node "
            "of its own") in p.stderr, p.stderr
    assert "lower --workers" not in p.stderr
