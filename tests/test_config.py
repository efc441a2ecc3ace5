import re
from pathlib import Path

import pytest

from distpg.cli import main
from distpg.config import (
    Config,
    ConfigError,
    config_from_dict,
    dump_config,
    inert_settings,
    load_config,
    load_run_config,
    merge_overrides,
)
from distpg.orchestrator import plan_placement


def cfg_with(*overrides):
    return config_from_dict(merge_overrides({}, list(overrides)))


def test_embedded_default_loads_and_resolves_preset():
    cfg = load_config()
    assert cfg.task.name == "reverse" and cfg.rollout.num_workers >= 2
    assert (cfg.model.n_layer, cfg.model.n_embd) == (2, 64)  # the tiny preset, resolved


def test_set_overrides_are_yaml_typed():
    cfg = cfg_with("task.length=8", "task.alphabet=abcdef", "learner.lr=3e-4", "run.stop_reward=null",
                   "ray.dashboard=true")
    assert cfg.task.length == 8 and cfg.task.alphabet == "abcdef"
    assert cfg.learner.lr == pytest.approx(3e-4) and cfg.run.stop_reward is None and cfg.ray.dashboard is True


def test_int_is_accepted_for_float():
    assert cfg_with("learner.lr=1").learner.lr == 1.0


def test_resolved_config_round_trips(tmp_path):
    cfg = cfg_with("model.preset=small", "task.name=addition")
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("rollout.num_wrkers=2", "unknown key rollout.num_wrkers (did you mean num_workers?); valid keys of rollout: "
                                 "num_workers"),
        ("rollout.zzz=2", "unknown key rollout.zzz; valid keys of rollout: num_workers"),
        ("bogus.x=1", "unknown key bogus"),
        ("rollout.num_workers=two", "rollout.num_workers='two': expected int"),
        ("rollout.num_workers=2.5", "rollout.num_workers=2.5: expected int"),
        ("ray.dashboard=1", "ray.dashboard=1: expected bool"),
        ("algo.baseline=median", "algo.baseline='median': allowed are none, ema, group"),
        ("model.preset=huge", "model.preset='huge': allowed are"),
        ("rollout.num_workers=0", "rollout.num_workers=0: must be at least 1"),
        ("rollout.top_p=1.5", "rollout.top_p=1.5: must be between"),
        ("learner.lr=-1", "learner.lr=-1.0: must be at least 0.0"),
        ("learner.lr_schedule=cosine_with_restarts", "learner.lr_schedule='cosine_with_restarts': allowed are "
                                                     "constant, linear, cosine"),
        ("learner.warmup_steps=-5", "learner.warmup_steps=-5: must be at least 0"),
        # accepted before: a stop at step 1, all CPUs, a placement error naming learner.num_cpus, no sample texts
        ("run.max_time_s=-1", "run.max_time_s=-1.0: must be above 0 (seconds), or null for no limit"),
        ("run.max_time_s=0", "run.max_time_s=0.0: must be above 0 (seconds), or null for no limit"),
        ("ray.num_cpus=0", "ray.num_cpus=0: must be at least 1, or null for this machine's CPUs"),
        ("ray.num_cpus=-3", "ray.num_cpus=-3: must be at least 1, or null for this machine's CPUs"),
        ("log.samples=-1", "log.samples=-1: must be at least 0"),
        ("learner.min_lr_ratio=1.5", "learner.min_lr_ratio=1.5: must be between 0.0 and 1.0"),
        ("rollout.temperature=0", "rollout.temperature=0: must be above 0 (1.0 samples from the policy itself); "
                                  "0 would sample greedily: every sample of a prompt the same"),
        ("rollout.temperature=-0.5", "rollout.temperature=-0.5: must be above 0"),
        ("model.n_head=3", "model.n_embd=64 must be divisible by model.n_head=3"),
        ("algo.whiten=off", "algo.whiten=False: expected str, got bool; allowed are none, batch, group (YAML reads "
                            "yes/no/on/off as true/false: quote the value)"),
        ("algo.baseline=null", "algo.baseline=null: expected str, got null; allowed are none, ema, group"),
        ("run.steps=", "run.steps=null: expected int, got null (YAML reads an empty value as null)"),
        ("task.name=mytask:", "task.name={'mytask': None}: expected str, got dict (YAML reads 'key: value' as a "
                              "mapping: quote the value)"),
        ("run.steps=1e3", "run.steps='1e3': expected int, got str (YAML reads 1e3 as text: write 1000 in full)"),
        # nan and inf pass every range check: an infinite learning rate made NaN weights and an
        # index-out-of-bounds error in the sampler a step later
        ("learner.lr=.inf", "learner.lr=inf: must be a finite number"),
        ("rollout.temperature=.inf", "rollout.temperature=inf: must be a finite number"),
        ("algo.entropy_coef=1e400", "algo.entropy_coef=inf: must be a finite number"),
        ("run.stop_reward=.nan", "run.stop_reward=nan: must be a finite number"),
        # torch's Adam refused them in the learner's actor ("Invalid beta parameter at index 0: 1.0"), and a
        # learning rate whose first Adam step overflows float32 failed step 1 with "value cannot be converted to
        # type float without overflow"
        # PPO's dual clip bounds a negative advantage's term at c A with c > 1 (veRL asserts clip_ratio_c > 1)
        ("algo.dual_clip=1", "algo.dual_clip=1.0: must be 0 (off) or above 1 (the bound c on the ratio of a token "
                             "with a negative advantage, veRL's clip_ratio_c; the default is 3.0)"),
        ("algo.dual_clip=0.5", "algo.dual_clip=0.5: must be 0 (off) or above 1"),
        ("algo.dual_clip=-3", "algo.dual_clip=-3.0: must be 0 (off) or above 1"),
        ("algo.dual_clip=.nan", "algo.dual_clip=nan: must be a finite number"),
        ("learner.beta1=1.0", "learner.beta1=1.0: must be below 1"),
        ("learner.beta2=1", "learner.beta2=1.0: must be below 1"),
        ("learner.lr=1e38", "learner.lr=1e+38: Adam's first step is learner.lr / (1 - learner.beta1) = 1e+39, past "
                            "float32's largest number (3.4e+38): at most 3.4e+37 with this beta1"),
        # a negative seed failed at the first step with numpy's traceback, one past 2**64 - 1 with
        # "restarting rollout worker 0 failed 6 times" (torch.manual_seed overflowed in every actor)
        ("run.seed=-1", "run.seed=-1: must be between 0 and 18446744073709551615"),
        ("run.seed=18446744073709551616", "run.seed=18446744073709551616: must be between 0 and"),
        ("task.eval_seed=-3", "task.eval_seed=-3: must be between 0 and"),
        ("run.eval_every=0", "run.eval_every=0: must be at least 1 (or null: no evaluation)"),
        ("task.eval_prompts_path=t.jsonl", "task.eval_prompts_path='t.jsonl' is scored every run.eval_every steps, "
                                           "which is null"),
        # several reward functions (TRL's reward_funcs and reward_weights)
        ("task.reward=[]", "task.reward=[]: name at least one reward function 'module:attr', or null"),
        ("task.reward=[a:f, 3]", "task.reward: 3 is not a reward function's 'module:attr'"),
        ("task.reward=[a:f, b:g, a:f]", "task.reward lists 'a:f' twice; to count a function more, give it a larger "
                                        "weight in task.reward_weights"),
        ("task.reward_weights=[1]", "task.reward_weights is set but task.reward is null"),
        ("task.reward=[a:f, b:g]\0task.reward_weights=[1]", "task.reward_weights=[1]: 1 weights for 2 reward "
                                                            "function(s) in task.reward"),
        ("task.reward=a:f\0task.reward_weights=[1, .nan]", "task.reward_weights=[1, nan]: nan is not a finite "
                                                          "number"),
        ("task.reward=[a:f, b:g]\0task.reward_weights=[1, yes]", "True is not a finite number"),
        ("task.reward=[a:f, b:g]\0task.reward_weights=2", "task.reward_weights=2: expected list or null"),
        ("task.reward=[a:f, b:g]\0task.reward_weights=[0, 0.0]", "task.reward_weights=[0, 0.0]: every weight is 0"),
    ],
)
def test_bad_values_name_the_field(override, fragment):
    with pytest.raises(ConfigError) as e:
        cfg_with(*override.split("\0"))
    assert fragment in str(e.value)


def test_dual_clip_is_3_by_default_and_takes_0_or_any_bound_above_1():
    assert cfg_with().algo.dual_clip == 3.0
    assert [cfg_with(f"algo.dual_clip={c}").algo.dual_clip for c in ("0", "1.01", "10")] == [0.0, 1.01, 10.0]


def test_group_baseline_needs_group_size_two():
    with pytest.raises(ConfigError, match=r"algo.baseline=group needs rollout.group_size >= 2 \(got 1\)"):
        cfg_with("rollout.group_size=1")
    assert cfg_with("rollout.group_size=1", "algo.baseline=ema").rollout.group_size == 1


def test_more_workers_than_cpus_is_refused_with_the_limit():
    cfg = cfg_with("rollout.num_workers=8", "rollout.prompts_per_step=32")
    with pytest.raises(ConfigError) as e:
        plan_placement(cfg, cpus=2, gpus=0)
    msg = str(e.value)
    assert "rollout.num_workers=8" in msg and "has 2" in msg and "at most 2 workers" in msg
    assert plan_placement(cfg_with(), cpus=2, gpus=0).use_gpu is False
    with pytest.raises(ConfigError, match=r"at most 1 worker at this size"):
        plan_placement(cfg_with(), cpus=1.5, gpus=0)
    with pytest.raises(ConfigError, match=r"no worker fits beside the learner: lower learner.num_cpus"):
        plan_placement(cfg_with(), cpus=1, gpus=0)


def test_gpu_placement_uses_fractions_and_checks_the_total():
    # the default config fits on one GPU: learner 0.5 + 2 workers x 0.25
    p = plan_placement(cfg_with(), cpus=4, gpus=1, nodes=[{"CPU": 4, "GPU": 1}])
    assert p.use_gpu and p.learner["GPU"] == 0.5 and p.worker["GPU"] == 0.25 and p.reserved(2, "GPU") == 1
    p = plan_placement(cfg_with("rollout.num_workers=3", "learner.num_gpus=1"), cpus=8, gpus=1.75)
    assert p.learner["GPU"] == 1
    with pytest.raises(ConfigError, match=r"need 1.25 GPUs, but the Ray cluster has 1.*or rollout.colocate=true"):
        plan_placement(cfg_with("rollout.num_workers=3"), cpus=8, gpus=1)
    # with worker 0 in the learner, 3 workers fit on one GPU
    assert plan_placement(cfg_with("rollout.num_workers=3", "rollout.colocate=true"), cpus=8, gpus=1).reserved(
        3, "GPU") == 1
    with pytest.raises(ConfigError, match="run.device=cuda but the Ray cluster has no GPUs"):
        plan_placement(cfg_with("run.device=cuda"), cpus=8, gpus=0)


def test_set_syntax_errors():
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        merge_overrides({}, ["rollout.num_workers"])
    with pytest.raises(ConfigError, match="SECTION.FIELD"):
        merge_overrides({}, ["steps=3"])


def test_a_stop_string_escape_outside_double_quotes_is_refused_with_both_spellings():
    """`--set 'rollout.stop=\\n'`: YAML keeps an unquoted backslash, so the run would stop at a backslash and an n
    (never, with a BPE tokenizer) where the user meant a newline; the error gives the spelling of each."""
    for item in (r"rollout.stop=\n", r"rollout.stop=[ab, \n]"):
        with pytest.raises(ConfigError) as e:
            load_config(None, [item])
        said = str(e.value)
        assert "a backslash and 'n'" in said and r"""for a newline double-quote it (--set 'rollout.stop="\n"')""" \
            in said and r"single-quote it ('\n')" in said, said
    with pytest.raises(ConfigError, match="for a tab double-quote it"):
        load_config(None, [r"rollout.stop=\t"])
    assert load_config(None, [r'rollout.stop="\n"']).rollout.stop == "\n"  # a newline
    assert load_config(None, [r"rollout.stop='\n'"]).rollout.stop == "\\n"  # the two characters, asked for
    assert load_config(None, [r"""rollout.stop=["\t", 'a\r', x\y]"""]).rollout.stop == ["\t", "a\\r", "x\\y"]


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML") as e:
        load_config(bad)
    assert "at line 1, column 6" in str(e.value) and "<unicode string>" not in str(e.value)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    bad.write_text("run:\n  steps: abc\n")  # a value: the file is named, as a run's config.yaml on --resume
    with pytest.raises(ConfigError, match=re.escape(f"run.steps='abc': expected int, got str (in {str(bad)!r})")):
        load_config(bad)
    with pytest.raises(ConfigError, match=re.escape(f"expected int, got str (in {str(bad)!r} or --set)")):
        load_run_config(bad, ["run.seed=1"])


def test_a_key_or_section_given_twice_in_a_config_file_is_an_error_not_a_silent_override(tmp_path):
    """PyYAML keeps the last of two equal keys: a section pasted twice lost every field of the first."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("learner:\n  lr: 0.01\nrollout:\n  group_size: 4\nlearner:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"'learner' is given twice \(lines 1 and 5\): the second would silently "
                                          "replace the first; keep one"):
        load_config(twice)
    twice.write_text("run:\n  steps: 10\n  seed: 1\n  steps: 20\n")
    with pytest.raises(ConfigError, match=r"'steps' is given twice \(lines 2 and 4\)"):
        load_config(twice)
    once = tmp_path / "once.yaml"  # a field name in two sections (num_cpus) is two keys, and fine
    once.write_text("run:\n  steps: 10\nlearner:\n  num_cpus: 1\nray:\n  num_cpus: 2\n")
    cfg = load_config(once)
    assert cfg.run.steps == 10 and cfg.learner.num_cpus == 1 and cfg.ray.num_cpus == 2


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.run.seed = 3  # type: ignore[misc]


def test_cli_config_error_exits_2_before_ray(capsys, tmp_path):
    code = main(["train", "--set", "rollout.group_size=1", "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert "distpg: error: algo.baseline=group needs rollout.group_size >= 2" in err
    assert "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing was written: the error came before the run started


def test_cli_unknown_task_exits_2(capsys, tmp_path):
    code = main(["train", "--set", "task.name=nosuchtask", "--run-dir", str(tmp_path / "r")])
    assert code == 2
    assert "task.name='nosuchtask' is not a built-in task (addition, prompts, reverse, sort)" in capsys.readouterr().err


def test_help_config_lists_every_field(capsys):
    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    for key in ("num_workers", "group_size", "baseline", "placement_strategy", "stop_reward"):
        assert key in out


def test_help_config_is_yaml_of_what_train_runs_by_default():
    import yaml

    from distpg.config import describe

    listed = yaml.safe_load(describe())
    assert listed == load_config(None).to_dict()  # the embedded default config, not the bare dataclass defaults
    assert listed["run"]["steps"] == 400 and listed["run"]["stop_reward"] == 0.97 and listed["ray"]["address"] is None


def test_help_config_shows_the_given_config_and_overrides(capsys):
    import yaml

    root = Path(__file__).resolve().parent.parent
    assert main(["train", str(root / "configs/addition.yaml"), "--set", "model.preset=small", "--help-config"]) == 0
    listed = yaml.safe_load(capsys.readouterr().out)
    assert listed == load_config(root / "configs/addition.yaml", ["model.preset=small"]).to_dict()
    assert listed["task"]["name"] == "addition" and listed["model"]["n_layer"] == 4
    assert main(["train", "--set", "model.preset=huge", "--help-config"]) == 2  # a bad value: the usual error


def test_seed_range_is_what_prompts_sampling_and_init_accept():
    from distpg.model import policy_from_config
    from distpg.orchestrator import sample_seed, step_prompts
    from distpg.tasks import make_task

    for seed in (0, 2**64 - 1):
        cfg = cfg_with(f"run.seed={seed}", f"task.eval_seed={seed}")
        step_prompts(make_task(cfg.task), cfg, 1)
        sample_seed(seed, 1, 0)
        policy_from_config(cfg.model, 16, seed)


def test_a_run_does_not_overwrite_a_config_yaml_it_did_not_write(tmp_path):
    # `distpg train exp/config.yaml --run-dir exp` replaced the user's CONFIG (its comments, its layout) by
    # the resolved config, without a word
    from distpg.orchestrator import prepare_run_dir

    mine = tmp_path / "exp" / "config.yaml"
    mine.parent.mkdir()
    mine.write_text("# lr sweep, point 3\nlearner:\n  lr: 0.003\n")
    cfg = load_config(mine)
    with pytest.raises(ConfigError, match=r"run folder '.*exp' holds a config.yaml that distpg did not write "
                                          r"\(your CONFIG\?\).*pick another --run-dir, or move the file"):
        prepare_run_dir(cfg, mine.parent, resume=False)
    assert mine.read_text() == "# lr sweep, point 3\nlearner:\n  lr: 0.003\n"
    # `distpg train` refuses it before starting anything, and leaves the folder as it found it (no .lock)
    from distpg.orchestrator import train

    with pytest.raises(ConfigError, match="holds a config.yaml that distpg did not write"):
        train(cfg, mine.parent)
    assert [p.name for p in mine.parent.iterdir()] == ["config.yaml"]
    # a run's own config.yaml, left by a run stopped before its first step, is written again
    run = tmp_path / "run"
    run.mkdir()
    prepare_run_dir(cfg, run, resume=False)
    prepare_run_dir(load_config(None, ["learner.lr=0.002"]), run, resume=False)
    assert load_run_config(run / "config.yaml").learner.lr == 0.002


def test_a_run_folder_records_the_code_and_libraries_it_ran_with(tmp_path):
    # config.yaml gave the config and seed, but not which distpg (commit, version) nor which torch made the
    # numbers: a run folder alone could not be reproduced
    import importlib.metadata
    import json
    import subprocess

    import torch
    import yaml

    from distpg.orchestrator import PROVENANCE, prepare_run_dir

    run = tmp_path / "run"
    run.mkdir()
    prepare_run_dir(load_config(), run, resume=False)
    prepare_run_dir(load_config(), run, resume=True)  # no checkpoint yet: it starts over from step 0
    lines = [json.loads(x) for x in (run / PROVENANCE).read_text().splitlines()]
    assert [x["start_step"] for x in lines] == [0, 0]  # one line per start, a resume's added
    assert lines[0]["config"] == yaml.safe_load((run / "config.yaml").read_text())
    first = lines[0]
    assert first["distpg"] == importlib.metadata.version("distpg") and first["torch"] == torch.__version__
    assert first["argv"]
    root = Path(__file__).resolve().parent.parent
    if (root / ".git").exists():  # a checkout (not a copy without .git, as a Ray job's working dir is)
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert first["git_commit"] == head.stdout.strip() and isinstance(first["git_dirty"], bool)


def test_a_resume_after_an_edit_of_config_yaml_names_the_changes_and_keeps_both(tmp_path, capsys):
    # the README has users raise run.steps in config.yaml to train on; an edit of learner.lr there went by
    # without a word, and the folder then described neither part of the run
    import json

    from distpg.orchestrator import PROVENANCE, prepare_run_dir

    run = tmp_path / "run"
    run.mkdir()
    prepare_run_dir(load_config(), run, resume=False)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("steps: 400", "steps: 600").replace("lr: 0.001", "lr: 0.5"))
    capsys.readouterr()
    prepare_run_dir(load_run_config(run / "config.yaml"), run, resume=True)
    out = capsys.readouterr().out
    assert "config.yaml changed since the run's last start: learner.lr: 0.001 -> 0.5, run.steps: 400 -> 600; " \
           "the steps from 1 on run with the new values (provenance.jsonl keeps both)" in out
    lines = [json.loads(x) for x in (run / PROVENANCE).read_text().splitlines()]
    assert [x["config"]["learner"]["lr"] for x in lines] == [0.001, 0.5]
    prepare_run_dir(load_run_config(run / "config.yaml"), run, resume=True)
    assert "changed" not in capsys.readouterr().out  # compared with the latest start


def test_a_resume_of_a_run_older_than_a_field_names_the_field_and_its_default(tmp_path, capsys):
    # a run started before algo.dual_clip existed resumed with the new default (3.0) without a word
    from distpg.orchestrator import prepare_run_dir

    run = tmp_path / "run"
    run.mkdir()
    prepare_run_dir(load_config(), run, resume=False)
    text = (run / "config.yaml").read_text()
    assert "  dual_clip: 3.0\n" in text and "  max_time_s:" in text
    (run / "config.yaml").write_text(text.replace("  dual_clip: 3.0\n", "").replace("max_time_s:", "max_time_z:"))
    capsys.readouterr()
    with pytest.raises(ConfigError, match="max_time_z"):  # an unknown field is still refused
        prepare_run_dir(load_run_config(run / "config.yaml"), run, resume=True)
    (run / "config.yaml").write_text(text.replace("  dual_clip: 3.0\n", ""))
    prepare_run_dir(load_run_config(run / "config.yaml"), run, resume=True)
    out = capsys.readouterr().out
    assert "config.yaml has no algo.dual_clip (added to distpg since the run started): from step 1 on they take " \
           "their defaults, algo.dual_clip = 3.0; set them in config.yaml to choose" in out
    (run / "config.yaml").write_text(text)  # a complete config.yaml: nothing to say
    prepare_run_dir(load_run_config(run / "config.yaml"), run, resume=True)
    assert "added to distpg" not in capsys.readouterr().out


def test_resume_with_run_dir_is_refused_not_ignored(capsys, tmp_path, monkeypatch):
    # `distpg train --resume A --run-dir B` went on in A without a word about B
    import distpg.orchestrator

    def no_training(*args, **kwargs):
        raise AssertionError("trained")

    monkeypatch.setattr(distpg.orchestrator, "train", no_training)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.yaml").write_text("{}")
    assert main(["train", "--resume", str(tmp_path / "a"), "--run-dir", str(tmp_path / "b")]) == 2
    assert f"--resume continues the run in {str(tmp_path / 'a')!r} itself; drop --run-dir" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"] and [p.name for p in (tmp_path / "a").iterdir()] == [
        "config.yaml"]
    # --set with --resume is refused too, saying where a setting is changed instead
    assert main(["train", "--resume", str(tmp_path / "a"), "--set", "run.steps=9"]) == 2
    assert f"drop CONFIG and --set (to change a setting, e.g. run.steps, edit {str(tmp_path / 'a' / 'config.yaml')!r}" \
        in capsys.readouterr().err


def test_a_kill_while_a_resume_cuts_metrics_jsonl_loses_no_step_it_keeps(tmp_path, monkeypatch):
    # the resume rewrote metrics.jsonl in place: a kill in the middle of that write (the run's SIGTERM handler
    # is not set yet then) left the file cut short, and the next resume kept only the steps before the cut
    import json

    from distpg.orchestrator import prepare_run_dir

    run = tmp_path / "run"
    run.mkdir()
    prepare_run_dir(load_config(), run, resume=False)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "time_s": float(s)}) + "\n" for s in range(1, 7)))
    from distpg import checkpoint
    from distpg.learner import Learner

    checkpoint.save(run, 4, {**Learner(load_config()).state(), "version": 4}, keep=3)
    real = Path.write_text

    def killed_midway(self, data, *args, **kwargs):
        if "metrics.jsonl" in self.name:
            real(self, data[: len(data) // 2], *args, **kwargs)
            raise KeyboardInterrupt("SIGKILL")
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        prepare_run_dir(load_run_config(run / "config.yaml"), run, resume=True)
    monkeypatch.setattr(Path, "write_text", real)
    assert prepare_run_dir(load_run_config(run / "config.yaml"), run, resume=True) == 4
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


# for each setting that another decides the use of: a value other than its default, a value of that other which
# puts it to use, one which does not
INERT = {"algo.max_staleness": ("3", "run.mode=async", "run.mode=sync"),
         "algo.staleness_schedule": ("exact", "run.mode=async", "run.mode=sync"),
         "algo.ema_decay": ("0.99", "algo.baseline=ema", "algo.baseline=group"),
         "algo.value_coef": ("0.1", "algo.baseline=value", "algo.baseline=none"),
         "algo.kl_estimator": ("k1", "algo.kl_coef=0.1", "algo.kl_coef=0.0"),
         "algo.is_cap": ("2.0", "algo.off_policy=truncated", "algo.off_policy=clipped"),
         "algo.clip_eps": ("0.1", "algo.off_policy=clipped", "algo.off_policy=none"),
         "algo.dual_clip": ("4.0", "algo.off_policy=clipped", "algo.off_policy=truncated"),
         "learner.min_lr_ratio": ("0.1", "learner.lr_schedule=cosine", "learner.lr_schedule=constant")}


@pytest.mark.parametrize("key", INERT)
def test_a_setting_the_config_never_uses_is_named_with_what_would_use_it(key):
    value, using, unused = INERT[key]
    notes = inert_settings(cfg_with(f"{key}={value}", unused))
    assert len(notes) == 1 and notes[0].startswith(f"{key}={value} has no effect: it applies only with "
                                                   f"{using.split('=')[0]}")
    assert notes[0].endswith(f"(here {unused})")
    assert inert_settings(cfg_with(f"{key}={value}", using)) == []  # put to use: nothing said
    assert inert_settings(cfg_with(unused)) == []  # at its default: nothing said


def test_a_warmup_longer_than_the_run_is_said():
    assert inert_settings(cfg_with("learner.warmup_steps=50", "run.steps=12")) == [
        "learner.warmup_steps=50 keeps the learning rate below learner.lr=0.001 for the whole run (run.steps=12: at "
        "most 22% of it)"]  # update 12 takes 11/50 of the peak
    assert inert_settings(cfg_with("learner.warmup_steps=11", "run.steps=12")) == []  # update 12 takes the peak


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("configs/*.yaml")), ids=lambda p: p.name)
def test_the_shipped_configs_set_nothing_they_do_not_use(path):
    if "init_from" in path.read_text():
        pytest.skip("reads a model folder (made by python -m distpg.examples.make_tiny_gpt2)")
    assert inert_settings(load_config(path)) == []
