"""Faults on real Ray: rollout worker processes killed by pid mid-run, in sync and async mode."""

import json
import os
import re
import signal
import subprocess
import threading

import pyarrow.parquet as pq
import pytest

from distpg.orchestrator import Trainer, TrainingError, plan_placement, train
from distpg.rollout import RolloutWorker
from tests.conftest import small_config

pytestmark = pytest.mark.ray

FOUR_WORKERS = ("rollout.num_workers=4", "rollout.num_cpus_per_worker=0.25", "rollout.prompts_per_step=8",
                "log.ledger=true", "run.checkpoint_every=100")


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def worker_pids() -> list[int]:
    """Rollout worker processes of this test session's Ray only: their raylet is a child of this process
    (other Ray runtimes on the machine are left alone)."""
    out = subprocess.run(["pgrep", "-f", "ray::RolloutWorker"], capture_output=True, text=True).stdout
    mine = []
    for pid in map(int, out.split()):
        try:
            if _ppid(_ppid(pid)) == os.getpid():
                mine.append(pid)
        except (OSError, ValueError, IndexError):
            pass
    return mine


class Chaos(threading.Thread):
    """Kill one rollout worker process (SIGKILL, by pid) each time the run has logged `every_steps` more steps,
    the first once training has begun, at most `max_kills` times. Counted in steps, not seconds, so that a
    fast run still sees its kills and a slow machine's replacements are not outpaced by them."""

    def __init__(self, every_steps: int, run_dir, max_kills: int = 1000) -> None:
        super().__init__(daemon=True)
        self.every_steps, self.run_dir, self.kills, self.max_kills = every_steps, run_dir, 0, max_kills
        self.stop = threading.Event()

    def steps(self) -> int:
        metrics = self.run_dir / "metrics.jsonl"
        return metrics.read_bytes().count(b"\n") if metrics.exists() else 0

    def run(self) -> None:
        # a worker killed while starting up is replaced too, but that is not what this test is about
        last = None
        while not self.stop.is_set() and self.kills < self.max_kills:
            step = self.steps()
            if step > 0 and (last is None or step - last >= self.every_steps):
                pids = worker_pids()
                if pids:
                    try:
                        os.kill(pids[self.kills % len(pids)], signal.SIGKILL)
                        self.kills += 1
                        last = step
                    except ProcessLookupError:
                        pass
            self.stop.wait(0.02)


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def consumed_and_generated(run):
    gen, con = pq.read_table(run / "rollouts"), pq.read_table(run / "ledger.parquet")
    return (list(zip(con.column("prompt_id").to_pylist(), con.column("sample_idx").to_pylist())),
            list(zip(gen.column("prompt_id").to_pylist(), gen.column("sample_idx").to_pylist())))


# the default run kills workers in sync mode; both async schedules are slow (the async tests' kill, ledger and
# resume tests cover async faults in the default run)
@pytest.mark.parametrize("mode", ["sync", pytest.param("async", marks=pytest.mark.slow),
                                  pytest.param("async-exact", marks=pytest.mark.slow)])
def test_chaos_killing_workers_loses_nothing(ray_session, tmp_path, mode):
    steps = 8
    # async-exact: algo.staleness_schedule=exact, whose replacements start from the version their share needs
    schedule = ["run.mode=async", "algo.staleness_schedule=exact"] if mode == "async-exact" else [f"run.mode={mode}"]
    cfg = small_config(f"run.steps={steps}", *FOUR_WORKERS, *schedule, "algo.max_staleness=2")
    # two kills, at about steps 1 and 4 of 8 (the second after the first's replacement has served 3 steps)
    chaos = Chaos(every_steps=3, run_dir=tmp_path / "chaos", max_kills=2)
    chaos.start()
    try:
        train(cfg, tmp_path / "chaos")
    finally:
        chaos.stop.set()
        chaos.join()
    recs = records(tmp_path / "chaos")
    assert chaos.kills == 2, "the chaos thread should have killed workers during the run"
    assert [r["step"] for r in recs] == list(range(1, steps + 1))
    assert recs[-1]["workers/restarts"] >= 1 and recs[-1]["workers/alive"] == 4
    consumed, generated = consumed_and_generated(tmp_path / "chaos")
    per_run = steps * 8 * cfg.rollout.group_size
    assert len(consumed) == len(set(consumed)) == per_run  # every sample consumed exactly once
    assert set(consumed) == set(generated) and len(generated) == per_run

    if mode != "async":  # reissued shares use the same prompts, seeds and weights: the numbers are unchanged
        train(small_config(f"run.steps={steps}", *FOUR_WORKERS, *schedule, "algo.max_staleness=2"),
              tmp_path / "clean")
        clean = records(tmp_path / "clean")
        assert [r["learner/loss"] for r in recs] == [r["learner/loss"] for r in clean]
        assert recs[-1]["rollout/reward_mean"] == clean[-1]["rollout/reward_mean"]


def test_restart_budget_stops_the_run_with_a_clear_error(ray_session, tmp_path):
    # two workers (the default): two actors fewer to start than FOUR_WORKERS, for kills that are counted alike
    cfg = small_config("run.steps=300", "log.ledger=true", "run.checkpoint_every=100", "rollout.max_restarts=1")
    chaos = Chaos(every_steps=2, run_dir=tmp_path / "r")
    chaos.start()
    try:
        with pytest.raises(TrainingError, match=r"restart budget rollout.max_restarts=1 is spent"):
            train(cfg, tmp_path / "r")
    finally:
        chaos.stop.set()
        chaos.join()
    assert not list((tmp_path / "r").rglob(".tmp-*")), "no half-written checkpoint is left behind"


class DiesOnSetWeights(RolloutWorker):
    """A replacement worker whose process exits while it is being handed the weights."""

    def set_weights(self, msg):
        os._exit(1)


@pytest.mark.parametrize("budget", [2, 1])
def test_a_replacement_that_dies_while_handed_the_weights_is_one_more_fault(ray_session, tmp_path, budget):
    ray = ray_session
    cfg = small_config(f"rollout.max_restarts={budget}")
    trainer = Trainer(cfg, tmp_path, plan_placement(cfg, cpus=2, gpus=0))
    started = []

    def start_worker(wid):  # the first replacement dies in set_weights, the next one is a plain worker
        started.append(wid)
        trainer.worker_class = DiesOnSetWeights if len(started) == 1 else RolloutWorker
        return Trainer.start_worker(trainer, wid)

    try:
        trainer.broadcast(trainer.learner.get_weights.remote(), 0)
        trainer.start_worker = start_worker
        if budget == 1:
            with pytest.raises(TrainingError, match=r"rollout worker 0 died while being handed the weights "
                               r"\(.*\), and the restart budget rollout.max_restarts=1 is spent"):
                trainer.restart_worker(0, "was lost")
            return
        trainer.restart_worker(0, "was lost")
        assert trainer.restarts == 2 and started == [0, 0]
        assert ray.get([w.get_version.remote() for w in trainer.workers], timeout=60) == [0, 0]
        trainer.open_outputs(0)
        record = trainer.sync_step(1)  # the second replacement samples its share
        assert record["workers/alive"] == 2 and record["policy/version"] == 1
        trainer.logger.close()
    finally:
        trainer.close()


class DiesAtStart(RolloutWorker):
    """A rollout worker whose process exits while it starts."""

    def __init__(self, *args, **kwargs):
        os._exit(1)


def test_a_trainer_that_fails_to_start_frees_what_it_reserved(ray_session, tmp_path, monkeypatch):
    # a TrainingError (or a SIGTERM) while the Trainer started its actors left its placement group reserved and
    # its actors running: the caller has no trainer to close, and a later run on the same runtime had no room
    ray = ray_session

    monkeypatch.setattr(Trainer, "worker_class", DiesAtStart)
    cfg = small_config("rollout.max_restarts=0", "rollout.num_workers=1")  # one worker: one actor fewer to start
    before = set(ray.util.placement_group_table())
    with pytest.raises(TrainingError, match=r"rollout worker 0 failed to start .*rollout.max_restarts=0 is spent"):
        Trainer(cfg, tmp_path, plan_placement(cfg, cpus=2, gpus=0))
    new = {k: v["state"] for k, v in ray.util.placement_group_table().items() if k not in before}
    assert len(new) == 1 and set(new.values()) == {"REMOVED"}, new



class NeverStarts(RolloutWorker):
    """A replacement that never gets going, as one waiting for a node to join after its node was lost."""

    def __init__(self, *args, **kwargs):
        import time

        time.sleep(3600)


def test_a_learner_lost_while_a_replacement_waits_for_room_stops_the_run_at_once(ray_session, tmp_path):
    """A node lost with the learner and a worker on it (a helper's trial, during start-up): the replacement worker
    waited out ray.timeout_s for a node to join (300 s), and then the run found the learner dead. The wait now
    asks the learner too, and stops the run as soon as it is found dead."""
    ray = ray_session
    cfg = small_config("rollout.num_workers=1", "ray.timeout_s=120")
    trainer = Trainer(cfg, tmp_path, plan_placement(cfg, cpus=2, gpus=0))
    try:
        ray.kill(trainer.learner, no_restart=True)
        trainer.worker_class = NeverStarts
        with pytest.raises(TrainingError, match=r"the learner's actor died \(ActorDiedError; its node lost\?\) while "
                                                r"waiting for a rollout worker to start, so the run stops"):
            trainer.restart_worker(0, "died (ActorDiedError)")
    finally:
        trainer.close()

class RaisesAtStart(RolloutWorker):
    """A rollout worker whose constructor raises, as one does on a node that cannot read the run's files."""

    def __init__(self, *args, **kwargs):
        from distpg.config import ConfigError

        raise ConfigError("task.prompts_path='data/p.jsonl': no such file")


def test_a_worker_whose_constructor_raises_stops_the_run_at_once_naming_the_error(ray_session, tmp_path,
                                                                                 monkeypatch):
    # the same error on every try: it was taken for a fault, retried 6 times with back-off (about 30 s) and
    # reported as "restarting rollout worker 0 failed 6 times; last: ActorDiedError", without the error itself
    monkeypatch.setattr(Trainer, "worker_class", RaisesAtStart)
    cfg = small_config("rollout.num_workers=1")  # one worker: one actor fewer to start
    with pytest.raises(TrainingError, match=r"rollout worker 0 failed to start: its constructor raised "
                                            r"distpg.config.ConfigError: task.prompts_path='data/p.jsonl': no such "
                                            r"file$"):
        Trainer(cfg, tmp_path, plan_placement(cfg, cpus=2, gpus=0))


def test_relative_paths_reach_workers_that_run_in_another_folder(ray_session, tmp_path, monkeypatch):
    # Ray starts a runtime's workers in the folder it started in (on a cluster, where `ray start` ran), not in
    # the driver's: a task.prompts_path relative to the driver's folder, which the driver found, was not found
    # by the workers (a job's entrypoint runs in its working dir's copy, where the workers find it too)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"say {w}:", "reference": w}) + "\n"
                                              for w in ("ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen")))
    # one rollout worker: one actor fewer to start
    cfg = small_config("task.name=prompts", "task.prompts_path=p.jsonl", "task.num_eval=2", "run.steps=1",
                       "task.reward=distpg.examples.rewards:match_reference", "rollout.num_workers=1")
    summary = train(cfg, tmp_path / "run")
    assert summary["steps"] == 1
    assert "prompts_path: p.jsonl" in (tmp_path / "run" / "config.yaml").read_text()  # the run's config as given


def test_a_reward_function_that_raises_on_some_samples_is_said_with_its_error(ray_session, tmp_path, capsys):
    """A reward function raising on part of the samples: those are masked (no gradient, rollout/failed_rewards)
    and the run goes on, as before, but now with a warning that names the first failure's prompt, completion and
    error (a helper's run trained on with 40% of its rewards failing, the error kept nowhere). It is said at the
    first such step, then again only once log.print_every steps have gone by (or the error's type changes), with
    the failures in between counted."""
    words = ["ant", "bee", "cat", "owl", "fox", "gnu", "yak", "dog", "hen", "pig", "cow", "rat"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {w}:"}) + "\n" for w in words))
    cfg = small_config("task.name=prompts", f"task.prompts_path={prompts}", "task.num_eval=2",
                       "task.reward=tests.user_rewards:raises_on_vowel", "rollout.max_new_tokens=4",
                       "run.steps=8", "log.print_every=3", "run.checkpoint_every=8")
    capsys.readouterr()
    train(cfg, tmp_path / "run")
    out = capsys.readouterr().out
    failed = {r["step"]: r["rollout/failed_rewards"]
              for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())}
    said, unsaid, expected = None, 0, []  # the rule: the first, then once 3 steps (print_every) have gone by
    for step in sorted(failed):
        unsaid += failed[step]
        if failed[step] and (said is None or step - said >= 3):
            expected.append((step, failed[step], unsaid if said is not None and unsaid != failed[step] else None,
                             said))
            said, unsaid = step, 0
    warned = re.findall(r"distpg: warning: step (\d+): the reward failed for (\d+) of its 16 samples(.*)", out)
    assert len(expected) >= 2 and [(int(s), int(n)) for s, n, _ in warned] == [e[:2] for e in expected], out
    for (_, _, between, before), (_, _, rest) in zip(expected, warned):
        assert (f" ({between} in all since step {before}'s warning)" in rest) == (between is not None), rest
        first = re.search(r"the first for prompt 'say (\w+):' and completion '.*': RuntimeError: my bug on '(\w+)'$",
                          rest)
        assert first and first[1] == first[2] and first[1][0] in "aeiou", rest
