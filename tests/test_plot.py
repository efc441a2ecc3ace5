"""`distpg plot`'s inputs: a run folder's metrics.jsonl is checked (and bad ones named) before anything is
drawn, so these run without matplotlib."""

import json

import pytest

from distpg.config import ConfigError
from distpg.plot import plot_runs


def write(run, lines):
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return run


def test_bad_metrics_files_and_unknown_metrics_are_named(tmp_path):
    good = write(tmp_path / "good", [json.dumps({"step": s, "time_s": s, "rollout/reward_mean": 0.1 * s})
                                     for s in (1, 2)])
    cut = write(tmp_path / "cut", [json.dumps({"step": 1, "time_s": 1, "rollout/reward_mean": 0.1}),
                                   '{"step": 2, "time_s": 2, "rollo', json.dumps({"step": 3})])
    empty = write(tmp_path / "empty", [])
    with pytest.raises(ConfigError, match=r"--metric 'foo/bar' is not in every record .*: rollout/reward_mean"):
        plot_runs([good], tmp_path / "x.png", metric="foo/bar")
    with pytest.raises(ConfigError, match=r"cut.*line 2 is not a JSON record"):
        plot_runs([good, cut], tmp_path / "x.png")
    with pytest.raises(ConfigError, match=r"empty.*holds no step yet"):
        plot_runs([empty], tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="not a distpg run folder"):
        plot_runs([tmp_path / "nowhere"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_a_last_line_cut_off_is_left_out_as_a_resume_does(tmp_path):
    """A run killed while writing a step's line, or plotted while it writes one: the steps before it plot."""
    from distpg.plot import read_metrics

    first = {"step": 1, "time_s": 1.5, "rollout/reward_mean": 0.1}
    run = write(tmp_path / "live", [json.dumps(first), '{"step": 2, "time_s": 2, "rollo'])
    assert read_metrics(run) == [first]
    cut = write(tmp_path / "cut", ['{"step": 1, "ti'])
    with pytest.raises(ConfigError, match=r"cut.*holds no step yet"):
        read_metrics(cut)


def test_smoothing_leaves_a_null_step_out_of_its_windows_only():
    from distpg.plot import _smooth

    nan = float("nan")
    # window 2: [1], [1, 3], [3, null], [null, 5], [5, 7]; a window of nulls only stays null
    out = _smooth([1.0, 3.0, nan, 5.0, 7.0], 2)
    assert out == [1.0, 2.0, 3.0, 5.0, 6.0]
    assert _smooth([1.0, 2.0, 3.0], 1) == [1.0, 2.0, 3.0]
    both = _smooth([nan, nan, 4.0], 2)
    assert both[0] != both[0] and both[1] != both[1] and both[2] == 4.0


def test_legend_labels_tell_runs_with_the_same_folder_name_apart(tmp_path):
    # a sweep laid out as sweep/<config>/seed<N>: the legend said seed0 for every config
    from distpg.plot import labels

    runs = [tmp_path / "sweep" / "lr1e-3" / "seed0", tmp_path / "sweep" / "lr3e-3" / "seed0",
            tmp_path / "sweep" / "lr3e-3" / "seed1"]
    assert labels(runs) == ["lr1e-3/seed0", "lr3e-3/seed0", "seed1"]
    assert labels([tmp_path / "a", tmp_path / "b", tmp_path / "a"]) == ["a", "b", "a"]  # a folder given twice


def test_an_eval_metric_plots_the_runs_evaluations(tmp_path):
    """--metric eval/reward_mean (a helper tried it) said the metric was in no record of metrics.jsonl: the
    evaluations of run.eval_every are in eval.jsonl, which an eval/ metric now reads, one point per evaluation."""
    import io

    pytest.importorskip("matplotlib")
    from distpg.metrics import MetricsLogger
    from distpg.plot import read_metrics

    run = write(tmp_path / "run", [json.dumps({"step": s, "time_s": s, "rollout/reward_mean": 0.1 * s})
                                   for s in range(1, 5)])
    logger = MetricsLogger(run, total_steps=4, tensorboard=False, print_every=10, stream=io.StringIO())
    for step, reward in ((2, 0.25), (4, 0.75)):  # as run.eval_every=2 writes them
        logger.log_eval(step, {"version": step, "eval/reward_mean": reward, "eval/exact_match": None,
                               "eval/failed_rewards": 0, "eval/num_prompts": 8, "eval/left_out": 0})
    logger.close()
    assert [(r["step"], r["eval/reward_mean"]) for r in read_metrics(run, evals=True)] == [(2, 0.25), (4, 0.75)]
    assert plot_runs([run], tmp_path / "eval.png", metric="eval/reward_mean").stat().st_size > 0
    with pytest.raises(ConfigError, match=r"--metric 'eval/nope' is not in every record .*: eval/exact_match, "
                                          r"eval/failed_rewards, eval/left_out, eval/num_prompts, eval/reward_mean, "
                                          r"version$"):
        plot_runs([run], tmp_path / "x.png", metric="eval/nope")
    plain = write(tmp_path / "plain", [json.dumps({"step": 1, "time_s": 1, "rollout/reward_mean": 0.1})])
    with pytest.raises(FileNotFoundError, match=r"eval.jsonl' not found: the run scored no held-out prompts while "
                                                r"training \(run.eval_every was null\)"):
        plot_runs([plain], tmp_path / "x.png", metric="eval/reward_mean")
    assert not (tmp_path / "x.png").exists()


def test_an_output_matplotlib_cannot_write_is_refused_before_drawing_and_the_file_written_is_named(tmp_path, capsys):
    """-o FOLDER wrote FOLDER.png and said 'wrote FOLDER'; -o p.txt was matplotlib's traceback after the work."""
    pytest.importorskip("matplotlib")
    from distpg.cli import main

    run = write(tmp_path / "run", [json.dumps({"step": s, "time_s": s, "rollout/reward_mean": 0.1 * s})
                                   for s in (1, 2)])
    (tmp_path / "adir").mkdir()
    assert main(["plot", str(run), "-o", str(tmp_path / "adir")]) == 2
    assert f"-o {str(tmp_path / 'adir')!r} is a folder; give a file name" in capsys.readouterr().err
    assert main(["plot", str(run), "-o", str(tmp_path / "p.txt")]) == 2
    err = capsys.readouterr().err
    assert f"-o {str(tmp_path / 'p.txt')!r}: matplotlib writes no '.txt' file; allowed: " in err and ".png" in err
    assert main(["plot", str(run), "-o", str(tmp_path / "curve")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'curve.png'}\n" and (tmp_path / "curve.png").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "curve.png", "run"]
