"""The driver: starts (or joins) Ray, places one learner and N rollout workers as actors in a placement
group, and runs the synchronous training loop:

    sample (N workers in parallel) -> update (learner) -> broadcast weights (one object, N readers)
    -> log -> checkpoint

Every wait on a remote call has a timeout. The driver never needs a GPU. Everything the loop computes
is decided by the config and the seed: prompts of step k come from rng(seed, k), and worker w samples
step k with seed(seed, k, w), so the same config and seed give the same numbers.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from distpg import checkpoint
from distpg.batch import RolloutWriter
from distpg.config import Config, ConfigError, dump_config
from distpg.learner import Learner
from distpg.metrics import MetricsLogger
from distpg.rollout import RolloutWorker, sampling_params
from distpg.tasks import make_task


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why in one paragraph."""


# ------------------------------------------------------------------------------------------- helpers


def step_prompts(task, cfg: Config, step: int) -> tuple[list[str], list[int]]:
    """The prompts of step `step` (1-based) and their globally unique ids; a function of (seed, step) only."""
    rng = np.random.default_rng([cfg.run.seed, step])
    n = cfg.rollout.prompts_per_step
    return task.sample_prompts(rng, n), [step * n + i for i in range(n)]


def sample_seed(seed: int, step: int, worker_id: int) -> int:
    return int(np.random.SeedSequence([seed, step, worker_id]).generate_state(1)[0])


def split(items: list, parts: int) -> list[list]:
    """Split into `parts` contiguous chunks whose sizes differ by at most one."""
    bounds = np.linspace(0, len(items), parts + 1).round().astype(int)
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def wait(refs, timeout: float, what: str):
    """ray.get with a timeout; failures become a TrainingError that names what failed and why."""
    try:
        return ray.get(refs, timeout=timeout)
    except GetTimeoutError:
        raise TrainingError(f"{what} did not finish within {timeout:g}s (raise ray.timeout_s or "
                            "rollout.timeout_s if the work is just slow)") from None
    except RayTaskError as e:
        cause = e.cause if getattr(e, "cause", None) is not None else e
        raise TrainingError(f"{what} failed: {type(cause).__name__}: {cause}") from None
    except RayActorError as e:
        raise TrainingError(f"{what} failed: the actor died ({e.__class__.__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None


def validate_with_task(cfg: Config, task) -> None:
    """Checks that need the task: does the model hold the longest prompt + completion?"""
    params = sampling_params(cfg, task)
    need = task.max_prompt_len + params.max_new_tokens
    if need > cfg.model.n_positions:
        raise ConfigError(
            f"model.n_positions={cfg.model.n_positions} is too short for task {task.name!r}: prompts of up to "
            f"{task.max_prompt_len} tokens plus {params.max_new_tokens} new tokens need {need}"
        )


@dataclass(frozen=True)
class Placement:
    use_gpu: bool
    learner: dict  # Ray resources of the learner bundle
    worker: dict  # Ray resources of each worker bundle


def plan_placement(cfg: Config, cpus: float, gpus: float) -> Placement:
    """Resources of each actor, checked against what the cluster has. Raises ConfigError."""
    use_gpu = cfg.run.device == "cuda" or (cfg.run.device == "auto" and gpus > 0)
    if cfg.run.device == "cuda" and gpus <= 0:
        raise ConfigError("run.device=cuda but the Ray cluster has no GPUs; use run.device=auto or cpu")
    learner = {"CPU": cfg.learner.num_cpus}
    worker = {"CPU": cfg.rollout.num_cpus_per_worker}
    if use_gpu:
        learner["GPU"] = cfg.learner.num_gpus
        worker["GPU"] = cfg.rollout.num_gpus_per_worker
    for name, res in (("learner.num_cpus", learner), ("rollout.num_cpus_per_worker", worker)):
        if not any(v > 0 for v in res.values()):
            raise ConfigError(f"{name}=0 with no GPU: every actor needs some CPU (a fraction is fine)")
    n = cfg.rollout.num_workers
    need_cpu = learner["CPU"] + n * worker["CPU"]
    if need_cpu > cpus + 1e-9:
        raise ConfigError(
            f"rollout.num_workers={n} workers x rollout.num_cpus_per_worker={worker['CPU']:g} CPUs + "
            f"learner.num_cpus={learner['CPU']:g} need {need_cpu:g} CPUs, but the Ray cluster has {cpus:g}; "
            f"allowed: at most {int((cpus - learner['CPU']) // max(worker['CPU'], 1e-9))} workers at this size, "
            "or lower rollout.num_cpus_per_worker"
        )
    if use_gpu:
        need_gpu = learner["GPU"] + n * worker["GPU"]
        if need_gpu > gpus + 1e-9:
            raise ConfigError(
                f"learner.num_gpus={learner['GPU']:g} + rollout.num_workers={n} x rollout.num_gpus_per_worker="
                f"{worker['GPU']:g} need {need_gpu:g} GPUs, but the Ray cluster has {gpus:g}"
            )
    return Placement(use_gpu, learner, worker)


def init_ray(cfg: Config, address: str | None) -> bool:
    """Join the cluster named by --address, ray.address or $RAY_ADDRESS, else start a local runtime bound
    to 127.0.0.1. Returns True when a local runtime was started here."""
    address = address or cfg.ray.address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=True)
        except (ConnectionError, RayError, ValueError) as e:
            raise TrainingError(f"cannot connect to the Ray cluster at {address!r}: {e}") from None
        return False
    ray.init(
        num_cpus=cfg.ray.num_cpus or os.cpu_count(),
        include_dashboard=cfg.ray.dashboard,
        dashboard_host="127.0.0.1",
        logging_level="WARNING",
        log_to_driver=True,
    )
    return True


# ----------------------------------------------------------------------------------------- the loop


class Trainer:
    """Owns the actors of one run and drives the synchronous loop. Use `run()`."""

    def __init__(self, cfg: Config, run_dir: Path, placement: Placement) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.task = make_task(cfg.task)
        self.pg = placement_group(
            [placement.learner] + [placement.worker] * cfg.rollout.num_workers,
            strategy=cfg.ray.placement_strategy,
        )
        wait(self.pg.ready(), cfg.ray.timeout_s, "reserving the placement group")
        device = "cuda" if placement.use_gpu else "cpu"

        def on_bundle(i: int, res: dict):
            return dict(
                num_cpus=res["CPU"],
                num_gpus=res.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            )

        threads = lambda cpus: max(1, round(cpus))  # noqa: E731
        self.learner = ray.remote(Learner).options(**on_bundle(0, placement.learner)).remote(
            cfg, threads(placement.learner["CPU"]), device
        )
        self.workers = [
            ray.remote(RolloutWorker).options(**on_bundle(i + 1, placement.worker)).remote(
                cfg, i, threads(placement.worker["CPU"]), device
            )
            for i in range(cfg.rollout.num_workers)
        ]
        self.worker_nodes = wait(
            [w.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()) for w in self.workers],
            cfg.ray.timeout_s, "starting the rollout workers",
        )

    def broadcast(self, weights_ref, version: int) -> None:
        """Hand one weights object to every worker; check each now holds `version`."""
        held = wait([w.set_weights.remote(weights_ref) for w in self.workers], self.cfg.ray.timeout_s,
                    "broadcasting weights")
        if any(v != version for v in held):
            raise TrainingError(f"after broadcasting version {version} the workers hold versions {held}")

    def run(self, start_step: int = 0) -> dict:
        cfg = self.cfg
        if start_step > 0:
            state, _ = checkpoint.load(checkpoint.latest(self.run_dir))
            wait(self.learner.load_state.remote(state), cfg.ray.timeout_s, "loading the checkpoint into the learner")
        weights_ref = self.learner.get_weights.remote()
        version = wait(self.learner.get_version.remote(), cfg.ray.timeout_s, "asking the learner its version")
        self.broadcast(weights_ref, version)

        logger = MetricsLogger(self.run_dir, cfg.run.steps, cfg.log.tensorboard, cfg.log.print_every,
                               start_step=start_step)
        writer = RolloutWriter(self.run_dir / "rollouts", cfg.log.rollout_flush_every) if cfg.log.rollouts else None
        recent = deque(maxlen=5)
        record: dict = {}
        step = start_step
        try:
            for step in range(start_step + 1, cfg.run.steps + 1):
                record = self.step(step, logger, writer)
                recent.append(record["rollout/reward_mean"])
                if step % cfg.run.checkpoint_every == 0 and step < cfg.run.steps:
                    self.save(step)
                if cfg.run.stop_reward is not None and len(recent) == recent.maxlen and \
                        np.mean(recent) >= cfg.run.stop_reward:
                    print(f"mean reward of the last {len(recent)} steps reached run.stop_reward="
                          f"{cfg.run.stop_reward}; stopping at step {step}", flush=True)
                    break
            self.save(step)
        finally:
            if writer is not None:
                writer.flush()
            logger.close()
        return {"steps": step, "final_reward": record.get("rollout/reward_mean"), "run_dir": str(self.run_dir)}

    def step(self, step: int, logger: MetricsLogger, writer: RolloutWriter | None) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        prompts, ids = step_prompts(self.task, cfg, step)
        refs = [
            w.sample.remote(p, i, sample_seed(cfg.run.seed, step, wid))
            for wid, (w, p, i) in enumerate(zip(self.workers, split(prompts, len(self.workers)),
                                                split(ids, len(self.workers))))
        ]
        batches: list[pa.RecordBatch] = wait(refs, cfg.rollout.timeout_s, f"rollout of step {step}")
        t1 = time.perf_counter()
        metrics_ref, weights_ref = self.learner.update.options(num_returns=2).remote(*refs)
        # while the learner works: rollout statistics and Parquet
        stats = rollout_stats(batches)
        rollout_tokens = stats.pop("_tokens")
        if writer is not None:
            writer.add(step, batches)
        lm = wait(metrics_ref, cfg.ray.timeout_s, f"learner update of step {step}")
        t2 = time.perf_counter()
        self.broadcast(weights_ref, lm["policy/version"])
        t3 = time.perf_counter()
        metrics = {
            **stats,
            **lm,
            "perf/step_s": t3 - t0,
            "perf/rollout_s": t1 - t0,
            "perf/learn_s": t2 - t1,
            "perf/sync_s": t3 - t2,
            "perf/rollout_tokens_per_s": rollout_tokens / (t1 - t0),
            "workers/alive": len(self.workers),
            "workers/restarts": 0,
            "workers/nodes": len(set(self.worker_nodes)),
        }
        samples = None
        if cfg.log.samples and (step % cfg.log.sample_every == 0 or step == 1):
            first = batches[0].slice(0, cfg.log.samples).to_pydict()
            samples = list(zip(first["prompt_text"], first["completion_text"], first["reward"]))
        return logger.log(step, metrics, samples)

    def save(self, step: int) -> None:
        state = wait(self.learner.state.remote(), self.cfg.ray.timeout_s, "fetching the learner state")
        checkpoint.save(self.run_dir, step, state, self.cfg.run.keep_checkpoints)

    def close(self) -> None:
        for actor in [self.learner, *self.workers]:
            ray.kill(actor)
        remove_placement_group(self.pg)


def describe_run(cfg: Config, trainer: Trainer, placement: Placement, resources: dict, local: bool) -> str:
    where = "local Ray" if local else "Ray cluster"
    m = cfg.model
    return (
        f"distpg: {cfg.rollout.num_workers} rollout workers on {len(set(trainer.worker_nodes))} node(s) + 1 learner, "
        f"{where} with {resources.get('CPU', 0):g} CPUs / {resources.get('GPU', 0):g} GPUs "
        f"({'GPU' if placement.use_gpu else 'CPU'} training); task {cfg.task.name}; model {m.n_layer}x{m.n_embd}; "
        f"{cfg.rollout.prompts_per_step} prompts x {cfg.rollout.group_size} samples per step; "
        f"baseline {cfg.algo.baseline}; {cfg.run.steps} steps"
    )


def rollout_stats(batches: list[pa.RecordBatch]) -> dict:
    table = pa.Table.from_batches(batches)
    reward = table.column("reward").to_numpy()
    ok = table.column("reward_ok").to_numpy()
    lengths = np.array([len(x) for x in table.column("completion_tokens").to_pylist()])
    r = reward[ok]
    return {
        "rollout/reward_mean": float(r.mean()) if len(r) else float("nan"),
        "rollout/reward_std": float(r.std()) if len(r) else float("nan"),
        "rollout/length_mean": float(lengths.mean()),
        "rollout/failed_rewards": int((~ok).sum()),
        "rollout/truncated_frac": float(table.column("truncated").to_numpy().mean()),
        "_tokens": int(lengths.sum()),
    }


def prepare_run_dir(cfg: Config, run_dir: Path, resume: bool) -> int:
    """Create the run folder and write the resolved config; on resume, return the step to continue from."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        if (run_dir / "metrics.jsonl").exists():
            raise ConfigError(f"run folder {str(run_dir)!r} already holds a run; use --resume {run_dir} to "
                              "continue it or pick another --run-dir")
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        return 0
    ckpt = checkpoint.latest(run_dir)
    if ckpt is None:
        raise ConfigError(f"--resume {str(run_dir)!r}: no complete checkpoint under {run_dir}/checkpoints")
    _, state = checkpoint.load(ckpt)
    start = int(state["step"])
    # forget what the interrupted run logged after its last checkpoint
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        import json

        kept = [line for line in metrics.read_text().splitlines() if line and json.loads(line)["step"] <= start]
        metrics.write_text("".join(line + "\n" for line in kept))
    for f in (run_dir / "rollouts").glob("steps_*.parquet"):
        if int(f.stem.split("_")[1].split("-")[0]) > start:
            f.unlink()
    return start


def train(cfg: Config, run_dir: Path, address: str | None = None, resume: bool = False) -> dict:
    """Run a training job end to end. Raises ConfigError (bad config) or TrainingError (run failed)."""
    task = make_task(cfg.task)
    validate_with_task(cfg, task)
    address_given = address or cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if not address_given and not ray.is_initialized():  # a local runtime: check the fit before starting Ray
        import torch

        gpus = torch.cuda.device_count() if cfg.run.device != "cpu" else 0
        plan_placement(cfg, cfg.ray.num_cpus or os.cpu_count(), gpus)
    start_step = prepare_run_dir(cfg, Path(run_dir), resume)
    started = False if ray.is_initialized() else init_ray(cfg, address)  # a caller's runtime is reused
    trainer = None
    try:
        res = ray.cluster_resources()
        placement = plan_placement(cfg, res.get("CPU", 0), res.get("GPU", 0))
        trainer = Trainer(cfg, Path(run_dir), placement)
        print(describe_run(cfg, trainer, placement, res, started), flush=True)
        return trainer.run(start_step)
    finally:
        if trainer is not None:
            trainer.close()
        if started:
            ray.shutdown()
