"""The driver: starts (or joins) Ray, places one learner and N rollout workers as actors in a placement
group, and runs the synchronous training loop:

    sample (N workers in parallel; each call carries the newest weights, one object for N readers)
    -> update (learner) -> log -> checkpoint

Every wait on a remote call has a timeout. The driver never needs a GPU. Everything the loop computes
is decided by the config and the seed: prompts of step k come from rng(seed, k), and worker w samples
step k with seed(seed, k, w), so the same config and seed give the same numbers.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.exceptions import (
    GetTimeoutError,
    NodeDiedError,
    ObjectLostError,
    OutOfMemoryError,
    RayActorError,
    RayError,
    RayTaskError,
    WorkerCrashedError,
)
from ray.job_config import JobConfig
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from distpg import checkpoint
from distpg.batch import UNFLUSHED, RolloutWriter, write_table
from distpg.colocated import ColocatedLearner
from distpg.config import (
    RUN_ORIGIN,
    Config,
    ConfigError,
    absolute_run_paths,
    dump_run_config,
    in_job_copy,
    inert_settings,
    node_resources,
    run_origin,
    snapshot_prompts,
    stop_strings,
)
from distpg.learner import Learner
from distpg.metrics import EVALS, MetricsLogger, cut_records, read_records
from distpg.model import policy_shape, tensor_shapes
from distpg.policy import task_for
from distpg.rewards import RewardError, failure_in, step_failure
from distpg.rollout import RolloutWorker, sampling_params
from distpg.stopping import (
    SIGNALLED,
    as_signalled,
    ctrl_c_after_it,
    kept_across_ray_init,
    put_back,
    said_and_ignored_while_stopping,
    signals_interrupt,
)


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why in one paragraph. `last_step`, where known: the step the run
    had done and checkpointed when it stopped (nothing after it was learned)."""

    def __init__(self, message: str, last_step: int | None = None) -> None:
        super().__init__(message)
        self.last_step = last_step


class RewardFailure(TrainingError):
    """A step's rollout failed because the reward function failed on every sample of a batch: no update of the
    step has started, and (async) the update in flight has been logged, so the learner holds the last logged
    step (which `Trainer.run` checkpoints)."""


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


def wait(refs, timeout: float, what: str, passthrough: tuple[type[BaseException], ...] = (),
         why: str = "raise ray.timeout_s or rollout.timeout_s if the work is just slow"):
    """ray.get with a timeout; failures become a TrainingError that names what failed and why, except
    those of a type in `passthrough`, which the caller handles. `why`: what a timeout's message adds, in
    parentheses (the settings that set `timeout`, and which to raise)."""
    try:
        return ray.get(refs, timeout=timeout)
    except passthrough:
        raise
    except GetTimeoutError:
        raise TrainingError(f"{what} did not finish within {timeout:g}s ({why})") from None
    except RayTaskError as e:
        raise task_failure(what, e) from None
    except RayActorError as e:
        if (raised := init_error(e)) is not None:
            raise TrainingError(f"{what} failed: the actor's constructor raised {raised}") from None
        raise TrainingError(f"{what} failed: the actor died ({e.__class__.__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None


def eval_prompts(cfg: Config, task) -> tuple[int, str]:
    """How many prompts a run.eval_every evaluation scores, and what names them: the task's held-out prompts
    (task.num_eval), or those of task.eval_prompts_path that the model holds, counted as the learner reads them."""
    if not cfg.task.eval_prompts_path:
        return len(task.eval_prompts()), "task.num_eval"
    from distpg.evaluate import test_set

    budget = sampling_params(cfg, task).max_new_tokens
    test = test_set(cfg, cfg.task.eval_prompts_path, task.tokenizer, budget, "task.eval_prompts_path")
    return len(test.eval_prompts()), f"task.eval_prompts_path={cfg.task.eval_prompts_path}"


def eval_wait(cfg: Config, num_prompts: int, prompts: str) -> tuple[float, str]:
    """How long the driver waits for a run.eval_every evaluation of `num_prompts` prompts (`prompts` names them:
    task.num_eval, task.eval_prompts_path), and what the timeout's message says of it: (seconds, why).

    The evaluation generates one greedy completion per prompt on the learner, so it is granted what a worker is
    granted for its share of a step's samples, rollout.timeout_s, for each such share of its completions, plus
    ray.timeout_s for the call: the wait grows with the held-out set (a test file of thousands of prompts), and
    a learner that hangs is still caught."""
    r = cfg.rollout
    share = -(-r.prompts_per_step // r.num_workers) * r.group_size  # the most samples a worker draws in a step
    shares = max(1, -(-num_prompts // share))
    why = (f"ray.timeout_s={cfg.ray.timeout_s:g} + rollout.timeout_s={r.timeout_s:g} x {shares}: one "
           f"rollout.timeout_s for each {share} of the {num_prompts} completions ({prompts}), a worker's share of "
           f"a step (rollout.prompts_per_step={r.prompts_per_step} / rollout.num_workers={r.num_workers} x "
           f"rollout.group_size={r.group_size}); raise rollout.timeout_s if the evaluation is just slow")
    return cfg.ray.timeout_s + shares * r.timeout_s, why


def init_error(e: BaseException) -> str | None:
    """Where an actor died because its constructor raised (a config it cannot use, a file or module missing on
    its node), that exception: the last line of its traceback. The same error would follow on every restart,
    so it is no fault to retry. None for other deaths."""
    if not getattr(e, "actor_init_failed", False):
        return None
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def _raise_init_error(e: BaseException, wid: int) -> None:
    """A TrainingError where rollout worker `wid`'s constructor raised (`init_error`); else nothing."""
    if (raised := init_error(e)) is not None:
        raise TrainingError(f"rollout worker {wid} failed to start: its constructor raised {raised}") from None


def task_failure(what: str, e: RayTaskError) -> TrainingError:
    """The error of a remote call that raised, naming `what` and the exception: a RewardFailure where the
    reward function failed on a whole batch (a rollout, or a colocated step's sampling)."""
    cause = e.cause if getattr(e, "cause", None) is not None else e
    error = RewardFailure if isinstance(cause, RewardError) else TrainingError
    return error(f"{what} failed: {type(cause).__name__}: {cause}")


def _busy_note(placement: Placement, num_workers: int, settle_s: float = 2.0) -> str | None:
    """What the run needs that the cluster has but is not free now (other jobs hold it), or None.

    Ray reports freed resources a little late (tens of ms after a placement group is removed), so a run that
    follows another in one process (`distpg scale`, `distpg bench`) would name its predecessor's share as
    held by others: a shortage counts only if it lasts `settle_s`."""
    deadline = time.monotonic() + settle_s
    while (short := _short_of(placement, num_workers, ray.available_resources())) and time.monotonic() < deadline:
        time.sleep(0.05)
    if short is None:
        return None
    res, need, free = short
    return (f"the run reserves {need:g} {res}s and {free:g} of the cluster's {ray.cluster_resources().get(res, 0):g} "
            "are free (other jobs or actors hold the rest)")


def _short_of(placement: Placement, num_workers: int, have: dict) -> tuple[str, float, float] | None:
    """(resource, reserved, have) for the first of CPU and GPU that `have` holds less of than the run
    reserves, or None."""
    for res in ("CPU", "GPU"):
        need = placement.reserved(num_workers, res)
        if need > have.get(res, 0) + 1e-9:
            return res, need, have.get(res, 0)
    return None


def validate_with_task(cfg: Config, task) -> None:
    """Checks that need the task: does the model hold the longest prompt + completion? Can the tokenizer of
    `model.init_from` write the task's prompts? (And is it a model folder, not a run's copy without weights?)"""
    if cfg.model.init_from is not None:
        from distpg.hf import end_tokens_note, is_snapshot

        if is_snapshot(cfg.model.init_from):
            raise ConfigError(f"model.init_from={cfg.model.init_from!r} is a run's copy of the folder it started "
                              "from, without the weights: train from the original folder, or from a run's policy "
                              "exported with distpg export")
        note = end_tokens_note(cfg.model.init_from)
        if note is not None:
            print(f"distpg: {note}", flush=True)
        for prompt in task.eval_prompts():
            try:
                task.tokenizer.encode(prompt)
            except Exception as e:  # the tokenizers library raises its own types (a WordLevel vocabulary: no [UNK])
                raise ConfigError(
                    f"model.init_from={cfg.model.init_from!r}: its tokenizer cannot encode task {task.name!r}'s "
                    f"prompt {prompt!r} ({e}); a character policy exported by distpg knows only its own task's "
                    "characters") from None
    if getattr(task, "token_budget", None):  # a character task encoded with model.init_from's tokenizer
        per_char, added, (prompt_len, new_tokens) = task.token_budget
        print(f"distpg: task {task.name!r} counts characters, and model.init_from's tokenizer writes one of its "
              f"characters in up to {per_char} token(s){f' and adds {added} to a text' if added else ''}: "
              f"prompts of up to {prompt_len} characters are taken as up to {task.max_prompt_len} tokens, and "
              f"completions get {task.max_new_tokens} tokens for {new_tokens} characters "
              "(rollout.max_new_tokens sets them)", flush=True)
    for stop in stop_strings(cfg.rollout):
        try:
            task.tokenizer.encode(stop)
        except Exception:  # a character tokenizer raises KeyError or ValueError; `tokenizers` its own types
            raise ConfigError(f"rollout.stop: the policy's tokenizer cannot write {stop!r}, so it would never end a "
                              f"completion (a character tokenizer knows only the characters of task {task.name!r})") \
                from None
    params = sampling_params(cfg, task)
    if cfg.task.eval_prompts_path:  # the learner's run.eval_every reads it: refused now rather than at the first
        from distpg.evaluate import test_set

        test_set(cfg, cfg.task.eval_prompts_path, task.tokenizer, params.max_new_tokens, "task.eval_prompts_path")
    need = task.max_prompt_len + params.max_new_tokens
    if need > cfg.model.n_positions:
        fix = ""
        if task.name == "prompts":
            room = cfg.model.n_positions - params.max_new_tokens
            shown = task.longest if len(task.longest) <= 60 else task.longest[:57] + "..."
            fix = (f" (the longest: {shown!r}); set "
                   f"task.max_prompt_tokens={room} to leave out the longer prompts" if room > 0 else "")
        whose = (f"model.init_from={cfg.model.init_from!r} has n_positions={cfg.model.n_positions} (its "
                 "config.json's; a checkpoint's positions cannot grow)" if cfg.model.init_from
                 else f"model.n_positions={cfg.model.n_positions}")
        shorter = (f"; or lower rollout.max_new_tokens (now {params.max_new_tokens})" if cfg.model.init_from
                   and params.max_new_tokens > 1 else "")
        raise ConfigError(
            f"{whose} is too short for task {task.name!r}: prompts of up to "
            f"{task.max_prompt_len} tokens plus {params.max_new_tokens} new tokens need {need}{fix}{shorter}"
        )
    if getattr(task, "ignored_columns", None):  # e.g. a TRL dataset's `answer`, which is not a reference here
        missing = task.without_reference
        which = ("no row has a 'reference' (the reward function gets reference=None)" if missing == task.num_rows
                 else f"{missing} of {task.num_rows} rows have no 'reference' (the reward function gets "
                      "reference=None for them)" if missing else "")
        print(f"distpg: task.prompts_path={cfg.task.prompts_path!r}: column(s) {', '.join(task.ignored_columns)} "
              f"ignored: only 'prompt' and 'reference' are read{', and ' + which if which else ''} (a batched "
              "reward function, TRL's form with a 'completions' parameter, gets every column)", flush=True)
    if getattr(task, "dropped", 0):
        print(f"distpg: task.max_prompt_tokens={cfg.task.max_prompt_tokens}: left out {task.dropped} of "
              f"{task.num_rows} prompts, longer than that", flush=True)


NODE_RESOURCE_UNIT = 0.001  # of a node's custom resource per pinned bundle: pins it, leaves room for 1000


@dataclass(frozen=True)
class Placement:
    use_gpu: bool
    learner: dict  # Ray resources of the learner bundle (with its node resource when pinned)
    worker: dict  # Ray resources of each worker bundle, without a node resource
    worker_nodes: tuple = ()  # node resources the workers are pinned to, round-robin (empty: any node)
    colocated: bool = False  # rollout worker 0 runs in the learner's actor (rollout.colocate)

    def own_actors(self, num_workers: int) -> range:
        """The workers that get an actor and a bundle of their own."""
        return range(1 if self.colocated else 0, num_workers)

    def bundle_index(self, wid: int) -> int:
        return wid + (0 if self.colocated else 1)

    def reserved(self, num_workers: int, res: str) -> float:
        """How much of resource `res` ("CPU" or "GPU") the learner and the workers reserve together."""
        return self.learner.get(res, 0) + len(self.own_actors(num_workers)) * self.worker.get(res, 0)

    def worker_node(self, i: int) -> str | None:
        """The node resource worker i is pinned to (round-robin over worker_nodes), or None."""
        return self.worker_nodes[i % len(self.worker_nodes)] if self.worker_nodes else None

    def worker_bundle(self, i: int) -> dict:
        node = self.worker_node(i)
        return dict(self.worker) if node is None else {**self.worker, node: NODE_RESOURCE_UNIT}

    def bundles(self, num_workers: int) -> list[dict]:
        """The placement group: bundle 0 is the learner, bundle `bundle_index(i)` worker i."""
        return [self.learner] + [self.worker_bundle(i) for i in self.own_actors(num_workers)]


def cluster_nodes() -> list[dict]:
    """Total resources of each alive node of the connected Ray cluster."""
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def plan_placement(cfg: Config, cpus: float, gpus: float, nodes: list[dict] | None = None) -> Placement:
    """Resources of each actor, checked against what the cluster has (totals `cpus`, `gpus`; with `nodes`,
    each alive node's resources, also whether each bundle fits on some node and the pinned ones on theirs).
    Raises ConfigError before any actor starts."""
    use_gpu = cfg.run.device == "cuda" or (cfg.run.device == "auto" and gpus > 0)
    if cfg.run.device == "cuda" and gpus <= 0:
        raise ConfigError("run.device=cuda but the Ray cluster has no GPUs; use run.device=auto or cpu")
    worker_nodes, learner_node = node_resources(cfg)
    learner = {"CPU": cfg.learner.num_cpus}
    worker = {"CPU": cfg.rollout.num_cpus_per_worker}
    if use_gpu:
        learner["GPU"] = cfg.learner.num_gpus
        worker["GPU"] = cfg.rollout.num_gpus_per_worker
    for name, res in (("learner.num_cpus", learner), ("rollout.num_cpus_per_worker", worker)):
        if not any(v > 0 for v in res.values()):
            raise ConfigError(f"{name}=0 with no GPU: every actor needs some CPU (a fraction is fine)")
    n, colocated = cfg.rollout.num_workers, cfg.rollout.colocate
    placement = Placement(use_gpu, learner, worker, tuple(worker_nodes), colocated)
    # with rollout.colocate, worker 0 reserves nothing of its own
    workers = (f"rollout.num_workers={n} workers (worker 0 in the learner: rollout.colocate), {n - 1}" if colocated
               else f"rollout.num_workers={n} workers")
    hint = "" if colocated or cfg.run.mode != "sync" else " (or rollout.colocate=true: worker 0 runs in the learner)"
    # a node resource that only worker 0 would have been pinned to
    pinned = {placement.worker_node(i) for i in range(n)} - {None}
    if lost := pinned - {placement.worker_node(i) for i in placement.own_actors(n)}:
        raise ConfigError(f"rollout.node_resource={cfg.rollout.node_resource!r}: {sorted(lost)[0]!r} pins no "
                          "rollout worker, because with rollout.colocate worker 0 runs in the learner's actor, on "
                          "its node (learner.node_resource); list the resources of workers 1.. only")
    if learner_node is not None:
        learner[learner_node] = NODE_RESOURCE_UNIT
    if nodes is not None:  # first: a worker that fits on no node makes the totals' "at most N workers" wrong
        _check_nodes(placement, n, nodes, cfg.ray.placement_strategy)
    need_cpu = placement.reserved(n, "CPU")
    if need_cpu > cpus + 1e-9:
        most = max(0, int((cpus - learner["CPU"]) // max(worker["CPU"], 1e-9))) + colocated
        allowed = (f"at most {most} worker{'s' if most != 1 else ''} at this size, or lower "
                   f"rollout.num_cpus_per_worker{hint}" if most >= 1 else
                   f"no worker fits beside the learner: lower learner.num_cpus (or give Ray more CPUs){hint}")
        raise ConfigError(
            f"{workers} x rollout.num_cpus_per_worker={worker['CPU']:g} CPUs + "
            f"learner.num_cpus={learner['CPU']:g} need {need_cpu:g} CPUs, but the Ray cluster has {cpus:g}; "
            f"allowed: {allowed}"
        )
    if use_gpu:
        need_gpu = placement.reserved(n, "GPU")
        if need_gpu > gpus + 1e-9:
            raise ConfigError(
                f"learner.num_gpus={learner['GPU']:g} + {workers} x rollout.num_gpus_per_worker="
                f"{worker['GPU']:g} need {need_gpu:g} GPUs, but the Ray cluster has {gpus:g}{hint}"
            )
        if nodes is not None:
            # the actors that use a GPU can only go to the nodes that have one, with their CPUs: each may fit there
            # while all of them do not, and Ray would wait for room that never comes
            on_gpu = [b for b in placement.bundles(n) if b.get("GPU", 0) > 0]
            need = sum(b.get("CPU", 0) for b in on_gpu)
            have = sum(node.get("CPU", 0) for node in nodes if node.get("GPU", 0) > 0)
            if on_gpu and need > have + 1e-9:
                raise ConfigError(f"{len(on_gpu)} actor(s) use a GPU (learner.num_gpus, rollout.num_gpus_per_worker) "
                                  f"and need {need:g} CPUs beside it, but the nodes with GPUs have {have:g} CPUs; "
                                  "allowed: lower learner.num_cpus or rollout.num_cpus_per_worker, fewer "
                                  "rollout.num_workers, or run.device=cpu")
    return placement


def _check_nodes(placement: Placement, n: int, nodes: list[dict], strategy: str = "PACK") -> None:
    """Does every bundle fit on some node, do the bundles pinned to a node resource fit on the nodes that have
    it, and can they be placed as a strict `strategy` says? Raises ConfigError naming the field."""
    if not nodes:
        raise ConfigError("the Ray cluster has no alive nodes")
    custom = sorted({k for node in nodes for k in node if k not in ("CPU", "GPU", "memory", "object_store_memory")
                     and not k.startswith("node:")})
    groups: dict[str, list[dict]] = {}  # node resource -> the bundles pinned to it
    for path, bundle in [("learner", placement.learner)] + [
            ("rollout", placement.worker_bundle(i)) for i in placement.own_actors(n)]:
        pin = next((k for k in bundle if k not in ("CPU", "GPU")), None)
        field = f"{path}.node_resource"
        candidates = [node for node in nodes if pin is None or node.get(pin, 0) > 0]
        if pin is not None and not candidates:
            raise ConfigError(f"{field}={pin!r}: no alive node of the cluster has this resource; its custom "
                              f"resources are: {', '.join(custom) or 'none'}")
        for res, what in (("CPU", "num_cpus" if path == "learner" else "num_cpus_per_worker"),
                          ("GPU", "num_gpus" if path == "learner" else "num_gpus_per_worker")):
            want, best = bundle.get(res, 0), max(node.get(res, 0) for node in candidates)
            if want > best + 1e-9:
                where = f" with {pin!r}" if pin else ""
                raise ConfigError(f"{path}.{what}={want:g}: no single node{where} has that many {res}s (the "
                                  f"largest has {best:g}); an actor runs on one node")
        if pin is not None:
            groups.setdefault(pin, []).append(bundle)
    for pin, bundles in groups.items():
        for res in ("CPU", "GPU"):
            need = sum(b.get(res, 0) for b in bundles)
            have = sum(node.get(res, 0) for node in nodes if node.get(pin, 0) > 0)
            if need > have + 1e-9:
                learner = placement.learner.get(res, 0) if pin in placement.learner else 0
                each = placement.worker.get(res, 0)
                most = max(0, int((have - learner + 1e-9) // each)) if each > 0 else 0
                raise ConfigError(f"{len(bundles)} actor(s) pinned to node resource {pin!r} (rollout/learner"
                                  f".node_resource) need {need:g} {res}s, but the nodes with it have {have:g}; "
                                  f"allowed: at most {most} rollout worker{'s' if most != 1 else ''} there at this "
                                  f"size{' beside the learner' if learner else ''}: fewer rollout.num_workers, a "
                                  "list of node resources in rollout.node_resource (the workers are pinned to them "
                                  f"round-robin), or a lower rollout.num_{res.lower()}s_per_worker")
    _check_strict(placement.bundles(n), nodes, strategy, placement.colocated)


STRICT = ("STRICT_PACK", "STRICT_SPREAD")  # the placement strategies Ray does not bend (checked up front)


def _fits(bundle: dict, node: dict) -> bool:
    """Does `node` (total resources) hold `bundle`: its CPUs and GPUs, and its node resource if pinned?"""
    return all(node.get(k, 0) + 1e-9 >= v if k in ("CPU", "GPU") else node.get(k, 0) > 0 for k, v in bundle.items())


def _check_strict(bundles: list[dict], nodes: list[dict], strategy: str, colocated: bool) -> None:
    """Can Ray place `bundles` on `nodes` under STRICT_PACK (all on one node) or STRICT_SPREAD (each on a node
    of its own)? Ray would wait for room that never comes; raises ConfigError naming the field instead. PACK
    and SPREAD are preferences Ray bends: nothing to check."""
    if strategy not in STRICT:
        return
    field = f"ray.placement_strategy={strategy}"
    what = f"the learner and {len(bundles) - 1} rollout worker actor(s)"
    if strategy == "STRICT_PACK":
        total = {k: sum(b.get(k, 0) for b in bundles) for k in {k for b in bundles for k in b}}
        if not any(_fits(total, node) for node in nodes):
            pins = sorted(k for k in total if k not in ("CPU", "GPU"))
            need = f"{total.get('CPU', 0):g} CPUs" + (f" and {total['GPU']:g} GPUs" if total.get("GPU") else "")
            # what the nodes have of each thing needed (each may be short on its own)
            have = [f"the largest has {max(node.get('CPU', 0) for node in nodes):g} CPUs"]
            if total.get("GPU"):
                have.append(f"the most GPUs on one node: {max(node.get('GPU', 0) for node in nodes):g}")
            if pins and not any(all(k in node for k in pins) for node in nodes):
                have.append(f"no node has {'all of ' if len(pins) > 1 else ''}{', '.join(pins)}")
            raise ConfigError(f"{field} puts {what} on one node: they need {need}"
                              + (f" and the node resource(s) {', '.join(pins)}" if pins else "")
                              + f", and no node of the cluster has that ({'; '.join(have)}); "
                              "allowed: fewer or smaller actors, or PACK (which may use several nodes)")
        return
    # STRICT_SPREAD: a node per bundle, a bundle only where it fits (a bipartite matching, by augmenting paths)
    owner: dict[int, int] = {}  # node index -> bundle index

    def place(b: int, seen: set) -> bool:
        for j, node in enumerate(nodes):
            if j not in seen and _fits(bundles[b], node):
                seen.add(j)
                if j not in owner or place(owner[j], seen):
                    owner[j] = b
                    return True
        return False

    fit = [place(b, set()) for b in range(len(bundles))]  # a bundle once placed stays placed
    placed = sum(fit)
    if placed < len(bundles):
        # the bundles before the first that did not fit fit together, and no longer prefix does: fewer workers
        # keep the first ones (pinned round-robin), so the bound is that prefix, not how many fit in all;
        # the learner is bundle 0, and with rollout.colocate it hosts worker 0
        most = fit.index(False) - 1 + colocated
        fewer = f"rollout.num_workers <= {most}" if most >= 1 else "a cluster with room for the learner"
        raise ConfigError(f"{field} puts each of {what} on a node of its own, but only {placed} of them fit on "
                          f"distinct nodes of the cluster's {len(nodes)} alive node(s); allowed: {fewer}, more "
                          "nodes, or SPREAD (which may share nodes)")


def cluster_address(cfg: Config, address: str | None) -> str | None:
    """The cluster to join: --address, else ray.address, else $RAY_ADDRESS; None: start a local runtime."""
    from distpg.doctor import named_address

    return named_address(address, cfg.ray.address)[0]


def init_ray(cfg: Config, address: str | None, code_paths: Sequence[str] = ()) -> bool:
    """Join the cluster named by --address, ray.address or $RAY_ADDRESS (an address nothing listens on fails
    within seconds), else start a local runtime that listens on 127.0.0.1 only. Returns True when a local
    runtime was started here.

    `code_paths`: folders the actors import from besides the current one, which Ray puts on their sys.path
    (as it does the driver's current folder): the folder a resumed run started in, for its task and reward
    modules."""
    from distpg.doctor import DoctorError, address_text, auth_hint, named_address, probe, ray_env_defaults

    address, source = named_address(address, cfg.ray.address)
    ray_env_defaults()
    job = {"job_config": JobConfig(_py_driver_sys_path=list(code_paths))} if code_paths else {}
    if address:
        if address != "auto" and not address.startswith("ray://"):  # ray.init would retry an unreachable GCS
            # for minutes (Ray Client's ray:// address is for its server, not a GCS)
            try:
                probe(address, timeout=min(10.0, cfg.ray.timeout_s), source=source)
            except DoctorError as e:
                raise TrainingError(str(e)) from None
        try:
            with kept_across_ray_init():
                ray.init(address=address, logging_level="WARNING", log_to_driver=True, **job)
        except (ConnectionError, RayError, ValueError) as e:
            raise TrainingError(f"cannot connect to the Ray cluster at {address_text(address, source)}: "
                                f"{e}{auth_hint()}") from None
        return False
    start_local_ray(num_cpus=cfg.ray.num_cpus or os.cpu_count(), include_dashboard=cfg.ray.dashboard,
                    dashboard_host="127.0.0.1", logging_level="WARNING", log_to_driver=True, **job)
    return True


LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def start_local_ray(**kwargs):
    """`ray.init(address="local", **kwargs)`: a fresh runtime on this machine that serves this machine only.

    Ray then takes 127.0.0.1 as the node address, so its GCS, raylet, object manager and workers listen on
    loopback instead of every interface. (Ray's switch for this is the one it uses on macOS and Windows; it
    reads it when imported, hence the module constant as well as the environment the runtime's processes
    inherit.) Set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 to keep Ray's default. Both are restored afterwards,
    so joining a real cluster later in this process is unaffected.

    The runtime's processes are started in process groups of their own (see `_own_process_groups`); distpg's
    signal handlers stay (`kept_across_ray_init`)."""
    from distpg.doctor import ray_env_defaults

    ray_env_defaults()
    with _loopback_node(), _own_process_groups(), kept_across_ray_init():
        return ray.init(address="local", **kwargs)


@contextmanager
def _own_process_groups():
    """While the block runs, Ray starts the processes of a local runtime (GCS, raylet, dashboard, monitors) each
    in a process group of its own instead of the driver's, as Ray does on Windows. A signal to the driver's
    process group (`timeout` without --foreground, `kill -TERM -PGID`, Ctrl-Z) then reaches the driver alone,
    which stops the runtime itself, as on a SIGTERM to the driver. Sent to the runtime's processes as well, it
    stopped the raylet at once, which first told the GCS (still serving for a few milliseconds) that its node
    was gone: the driver's core worker then went to recover the objects of that node from the raylet's store
    and Ray ended the driver (exit status 1, without the resume hint), often before the driver could stop.
    They still end with the driver if it dies (Ray's kernel fate-sharing: where Ray has none, they are left in
    the driver's group, for Ray's reaper to find them). Ray's terminal Ctrl-C handling is unchanged: its
    processes block SIGINT wherever they are."""
    from ray._private import services, utils  # Ray's private API: a shortcut only, if there

    popen = getattr(services, "ConsolePopen", None)
    fate_sharing = getattr(utils, "detect_fate_sharing_support", lambda: False)
    if popen is None or sys.platform == "win32" or not fate_sharing():
        yield
        return

    class OwnGroupPopen(popen):
        def __init__(self, *args, **kwargs):
            preexec = kwargs.get("preexec_fn")

            def own_group_then_ray_s():
                os.setpgid(0, 0)
                if preexec is not None:
                    preexec()

            super().__init__(*args, **{**kwargs, "preexec_fn": own_group_then_ray_s})

    services.ConsolePopen = OwnGroupPopen
    try:
        yield
    finally:
        services.ConsolePopen = popen


def stop_local_ray() -> None:
    """`ray.shutdown()`, a second sooner where it stops the runtime `start_local_ray` started (joined to a
    cluster, it only disconnects, as ray.shutdown does). Ray stops the autoscaler's monitor process after the GCS,
    with SIGTERM, on which the monitor tries to report its end to the GCS that is gone, until Ray gives up on it
    after a second and kills it (SIGKILL). Killed first, it reports nothing, and a local runtime has nothing for
    it to scale. The rest stops as ray.shutdown stops it.

    ray.shutdown destroys the driver's core worker first, which sets SIGTERM's action back to the default
    (the Python handler, `signals_interrupt`'s, is then still named by signal.getsignal but no longer runs),
    and only then stops the runtime's processes, the longest part: a SIGTERM repeated meanwhile killed the
    driver outright. The Python handler is put back before the processes are stopped.

    Ray stops them gracefully: SIGTERM, then a second for each to exit. A runtime already going down (see
    `_going_down`: signalled with the driver, as by a scheduler that signals every process of a job) has its raylet and
    GCS spend that second each waiting on one another, so they are killed at once (SIGKILL)."""
    node = getattr(ray._private.worker, "_global_node", None)  # Ray's private API: a shortcut only, if there
    try:
        if node is not None:
            graceful = True
            if node.is_head():
                graceful = not _going_down(node)
                node.kill_monitor(check_alive=False)
            main = threading.current_thread() is threading.main_thread()
            kill_all = node.kill_all_processes

            def handler_back_then_kill_all(*args, **kwargs):
                handler = signal.getsignal(signal.SIGTERM)
                if main and handler is not None:  # None: a handler not set from Python
                    signal.signal(signal.SIGTERM, handler)
                return kill_all(*args, **(kwargs if graceful else {**kwargs, "allow_graceful": False}))

            node.kill_all_processes = handler_back_then_kill_all
    except AttributeError:  # another Ray version's Node: ray.shutdown alone stops the monitor
        pass
    ray.shutdown()


GCS_ALIVE_TIMEOUT_S = 0.5


def _going_down(node) -> bool:
    """Whether a local runtime is already going down: one of its processes has exited, or its GCS does not
    answer a read (it stops serving at once on SIGTERM; its other processes exit a moment later). A live GCS
    answers in about a millisecond; Ray's client gives up on one that has stopped after about a second."""
    if any(info.process.poll() is not None for infos in node.all_processes.values() for info in infos):
        return True
    try:
        node.get_gcs_client().internal_kv_get(b"distpg-alive", b"distpg", timeout=GCS_ALIVE_TIMEOUT_S)
    except Exception:  # Ray's RpcError (timed out, unavailable): not a GCS to stop gracefully
        return True
    return False


@contextmanager
def _loopback_node():
    from ray._private import ray_constants

    if os.environ.get(LOCAL_ONLY_ENV) == "1":
        yield
        return
    saved = os.environ.get(LOCAL_ONLY_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOCAL_ONLY_ENV], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        if saved[0] is None:
            os.environ.pop(LOCAL_ONLY_ENV, None)
        else:
            os.environ[LOCAL_ONLY_ENV] = saved[0]
        ray_constants.ENABLE_RAY_CLUSTER = saved[1]


GCS_RECONNECT_ENV = "RAY_gcs_rpc_server_reconnect_timeout_s"
GCS_LOST_EXIT = 1


def gcs_reconnect_s() -> float:
    """How long Ray lets this driver go without its cluster's GCS before it ends the process: the
    RAY_gcs_rpc_server_reconnect_timeout_s of this process's environment (Ray's documented switch), else Ray's
    default of 60 s."""
    try:
        return max(1.0, float(os.environ.get(GCS_RECONNECT_ENV, "60")))
    except ValueError:
        return 60.0


def watch_gcs(then: Callable[[], str], every_s: float = 1.0) -> threading.Event:
    """Watch the GCS (the head node) of the Ray cluster this driver is connected to, until the returned event is
    set, and end the run with a message when the GCS is lost. Ray itself ends the driver from C++ when its GCS
    has been gone for `gcs_reconnect_s()` (std::_Exit(1) after its log line "Failed to connect to GCS within 60
    seconds"), which no Python code outlives; until then the run goes on stepping on the nodes that are left. So
    a thread dials the GCS every `every_s`; unreachable for all but the last few seconds of Ray's timeout, it
    prints what happened and `then()`, what the user can do now (a run's: `head_lost_hint`; a `distpg scale`
    sweep's: where the sweep was), and ends the process the same way, exit status GCS_LOST_EXIT: nothing can be
    cleaned up without the GCS (the actors go with the cluster; the run folder keeps its checkpoints). Not
    through Ray Client (ray://): the GCS is for its server to reach, not for this process."""
    from ray._common.network_utils import parse_address

    done = threading.Event()
    if ray.util.client.ray.is_connected():
        return done
    host, port = parse_address(ray.get_runtime_context().gcs_address)
    reconnect = gcs_reconnect_s()
    limit = reconnect - min(5.0, reconnect / 2)  # ahead of Ray's own end

    def watch() -> None:
        lost_at = None
        while not done.wait(every_s):
            try:
                with socket.create_connection((host, int(port)), timeout=every_s):
                    lost_at = None
            except OSError:
                lost_at = lost_at or time.monotonic() - every_s  # it answered `every_s` ago at the latest
                if time.monotonic() - lost_at >= limit and not done.is_set():
                    print(f"distpg: training failed: lost the Ray head node: its GCS at {host}:{port} has not "
                          f"answered for {time.monotonic() - lost_at:.0f}s, and Ray ends this driver at "
                          f"{reconnect:g}s ({GCS_RECONNECT_ENV}); the run's actors are gone with the cluster. "
                          f"Restart the cluster; {then()}", file=sys.stderr, flush=True)
                    os._exit(GCS_LOST_EXIT)

    threading.Thread(target=watch, daemon=True, name="distpg-gcs-watch").start()
    return done


def head_lost_hint(run_dir: Path, steps: int) -> Callable[[], str]:
    """`watch_gcs`'s `then` for a run of `steps` steps in `run_dir`: its resume hint, as of when the head is lost."""
    return lambda: checkpoint.resume_hint(run_dir, steps)


# ----------------------------------------------------------------------------------------- the loop


class Trainer:
    """Owns the actors of one run and drives the synchronous loop. Use `run()`."""

    worker_class = RolloutWorker  # what each rollout worker actor runs (tests put a misbehaving one here)
    learner_class = Learner  # what the learner actor runs, unless rollout.colocate puts a worker in it

    def __init__(self, cfg: Config, run_dir: Path, placement: Placement) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.task = task_for(cfg)
        self.eval_timeout: tuple[float, str] | None = None  # run.eval_every's wait and its why: `evaluate`
        busy = _busy_note(placement, cfg.rollout.num_workers)  # before the group takes its share
        self.pg = placement_group(placement.bundles(cfg.rollout.num_workers), strategy=cfg.ray.placement_strategy)
        if busy:
            print(f"distpg: waiting up to ray.timeout_s={cfg.ray.timeout_s:g}s for room: {busy}", flush=True)
        self.placement = placement
        try:  # on any failure (a SIGTERM too) the caller gets no trainer to close: free the group here
            said = None  # a node lost after the fit was checked (Ray declares it dead a while later)
            try:
                ready, deadline = self.pg.ready(), time.monotonic() + cfg.ray.timeout_s
                while not ray.wait([ready], timeout=max(0.0, min(5.0, deadline - time.monotonic())))[0]:
                    said = self._say_shortage(said, "the placement group")
                    if time.monotonic() >= deadline:
                        raise TrainingError(f"reserving the placement group did not finish within "
                                            f"{cfg.ray.timeout_s:g}s (raise ray.timeout_s if the cluster is just "
                                            "slow to make room)")
                wait(ready, cfg.ray.timeout_s, "reserving the placement group")  # its errors, if it failed
            except TrainingError as e:
                raise TrainingError(f"{e}; {said or busy or 'the cluster had room when it was asked'}") from None
            self.device = "cuda" if placement.use_gpu else "cpu"
            learner_cls = ColocatedLearner if placement.colocated else self.learner_class
            self.learner = ray.remote(learner_cls).options(**self.on_bundle(0, placement.learner)).remote(
                cfg, _threads(placement.learner["CPU"]), self.device
            )
            self.restarts = 0
            self.weights_ref = None  # the newest published weights: what a restarted worker is handed
            self.ledger_base = None  # log.ledger on resume: the ledger of the steps up to the checkpoint
            self.version: int | None = None  # their policy version
            # with rollout.colocate, worker 0 is the learner's actor; its calls are those of a worker
            self.workers = [self.learner if placement.colocated and i == 0 else self.start_worker(i)
                            for i in range(cfg.rollout.num_workers)]
            # one worker in the learner and no other: a step is one call (ColocatedLearner.step)
            self.single_call = placement.colocated and cfg.rollout.num_workers == 1
            self.worker_nodes = [None] * len(self.workers)
            for w, ref in enumerate([_node_of(w) for w in self.workers]):
                try:
                    self.worker_nodes[w] = ray.get(ref, timeout=cfg.ray.timeout_s)
                except (*WORKER_FAULTS, GetTimeoutError) as e:
                    _raise_init_error(e, w)
                    self.restart_worker(w, f"failed to start ({type(e).__name__})")
        except BaseException:
            remove_placement_group(self.pg)  # and the actors in it; or it holds its share once the room is there
            raise

    def on_bundle(self, i: int, res: dict) -> dict:
        return dict(
            num_cpus=res["CPU"],
            num_gpus=res.get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
        )

    def start_worker(self, wid: int):
        return ray.remote(self.worker_class).options(**self.on_bundle(self.placement.bundle_index(wid),
                                                                  self.placement.worker)).remote(
            self.cfg, wid, _threads(self.placement.worker["CPU"]), self.device
        )

    def room_shortage(self, what: str = "the replacement") -> str | None:
        """Why the run's placement group cannot be whole on the cluster's live nodes (after a node loss), or
        None when they have the resources it reserves; `what` is what lacks the room (a replacement worker, or
        the placement group itself at start)."""
        n, strategy = self.cfg.rollout.num_workers, self.cfg.ray.placement_strategy
        short = _short_of(self.placement, n, ray.cluster_resources())  # live nodes
        if short is not None:
            res, need, have = short
            return (f"the run reserves {need:g} {res}s and the cluster's live nodes have {have:g}: no room for "
                    f"{what}")
        # enough in total, but maybe not on the right nodes: a node resource pinned to (learner/rollout
        # .node_resource) that only the lost node had, or a strict strategy
        if strategy in STRICT or self.placement.worker_nodes or any(
                k not in ("CPU", "GPU") for k in self.placement.learner):
            try:
                _check_nodes(self.placement, n, cluster_nodes(), strategy)
            except ConfigError as e:
                return f"no room for {what} on the cluster's live nodes: {e}"
        return None

    def restart_worker(self, wid: int, reason: str, weights_ref=None) -> None:
        """Replace worker `wid` (dead or hung) in its own bundle and hand it the current weights (or
        `weights_ref`, another published version).

        Its unfinished work is reissued by the caller with the same prompts and seed, so every sample is
        produced and counted exactly once, and a sync run's numbers are those of a run without the fault.
        """
        if self.workers[wid] is self.learner:
            raise TrainingError(f"rollout worker {wid}, which runs in the learner's actor (rollout.colocate), "
                                f"{reason}; it cannot be replaced without the learner, so the run stops")
        self.restarts += 1
        budget = self.cfg.rollout.max_restarts
        if self.restarts > budget:
            raise TrainingError(f"rollout worker {wid} {reason}, and the restart budget rollout.max_restarts="
                                f"{budget} is spent")
        print(f"distpg: rollout worker {wid} {reason}; replacing it (restart {self.restarts}/{budget})", flush=True)
        ray.kill(self.workers[wid], no_restart=True)
        said = self._say_shortage(None)
        # After a node loss Ray re-places the bundle only once it has declared the node dead: a replacement
        # started before that lands on the dead node and dies too, so try again a few times, backing off.
        for attempt in range(6):
            self.workers[wid] = self.start_worker(wid)
            try:
                self.worker_nodes[wid], said = self._started_on(self.workers[wid], said)
                break
            except WORKER_FAULTS as e:
                _raise_init_error(e, wid)
                if attempt == 5:
                    raise TrainingError(f"restarting rollout worker {wid} failed 6 times; last: "
                                        f"{type(e).__name__}") from None
                time.sleep(2**attempt)
            except GetTimeoutError:
                raise TrainingError(f"restarting rollout worker {wid}: it did not start within ray.timeout_s="
                                    f"{self.cfg.ray.timeout_s:g}s ({self.room_shortage() or 'is the cluster busy?'})"
                                    ) from None
        weights_ref = self.weights_ref if weights_ref is None else weights_ref
        if weights_ref is not None:
            try:
                wait(self.workers[wid].set_weights.remote(weights_ref), self.cfg.ray.timeout_s,
                     f"handing weights to the restarted rollout worker {wid}", passthrough=WORKER_FAULTS)
            except WORKER_FAULTS as e:  # the replacement died too: one more fault, against the same budget
                self.restart_worker(wid, f"died while being handed the weights ({type(e).__name__})", weights_ref)

    def _say_shortage(self, said: str | None, what: str = "the replacement") -> str | None:
        """Print the room shortage (`room_shortage`, for `what`) once it is known; returns what has been said."""
        if said is None and (said := self.room_shortage(what)):
            print(f"distpg: {said}; waiting up to ray.timeout_s={self.cfg.ray.timeout_s:g}s for a node to join",
                  flush=True)
        return said

    def _started_on(self, actor, said: str | None) -> tuple[str, str | None]:
        """The node a (re)started actor runs on, waited for up to ray.timeout_s. Ray declares a lost node dead
        only after its heartbeats have been missed for a while, so the shortage it leaves is looked for again
        every few seconds of the wait, and said when it shows, not when the wait ends. The learner is asked its
        version meanwhile: a node lost with the learner on it (at start, or mid-run with a worker) ends the run
        at once (TrainingError), where it waited out ray.timeout_s for room and then found the learner dead."""
        ref, deadline = _node_of(actor), time.monotonic() + self.cfg.ray.timeout_s
        probe = None if actor is self.learner else self.learner.get_version.remote()
        while True:
            try:
                return ray.get(ref, timeout=max(0.0, min(5.0, deadline - time.monotonic()))), said
            except GetTimeoutError:
                if time.monotonic() >= deadline:
                    raise
                said = self._say_shortage(said)
            if probe is not None and ray.wait([probe], timeout=0)[0]:
                try:
                    ray.get(probe, timeout=self.cfg.ray.timeout_s)
                except WORKER_FAULTS as e:
                    raise TrainingError(f"the learner's actor died ({type(e).__name__}; its node lost?) while "
                                        "waiting for a rollout worker to start, so the run stops") from None
                probe = self.learner.get_version.remote()

    def broadcast(self, weights_ref, version: int) -> None:
        """Hand one weights object to every worker; check each now holds `version`. A worker that died is
        replaced (and handed the same object)."""
        self.weights_ref, self.version = weights_ref, version
        acks = {w: worker.set_weights.remote(weights_ref) for w, worker in enumerate(self.workers)}
        for w, ref in acks.items():
            try:
                held = ray.get(ref, timeout=self.cfg.ray.timeout_s)
            except WORKER_FAULTS as e:
                self.restart_worker(w, f"died ({type(e).__name__})")
                continue
            except GetTimeoutError:
                self.restart_worker(w, f"did not load weights within {self.cfg.ray.timeout_s:g}s")
                continue
            except RayTaskError as e:
                raise TrainingError(f"broadcasting weights failed on worker {w}: {e.cause}") from None
            if held != version:
                raise TrainingError(f"after broadcasting version {version} worker {w} holds version {held}")

    def collect(self, step: int) -> tuple[list, list[pa.RecordBatch]]:
        """Every worker's share of step `step`, sampled with the newest weights (handed along with each sample
        call): (refs, batches) in worker order. A worker that dies or hangs past rollout.timeout_s is replaced
        and its share reissued. Raises TrainingError if a worker sampled with another policy version."""
        n, timeout = len(self.workers), self.cfg.rollout.timeout_s
        # [ref]: Ray hands the reference over unresolved, so the worker times its fetch (perf/sync_s)
        handed = [self.weights_ref]
        refs = {w: self.sample_part(step, w, handed) for w in range(n)}
        done: dict[int, tuple] = {}
        while refs:
            ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
            ready = set(ready)
            for w, ref in list(refs.items()):
                if ref not in ready:
                    self.restart_worker(w, f"did not return its share of step {step} within {timeout:g}s")
                    refs[w] = self.sample_part(step, w, handed)
                    continue
                try:
                    done[w] = (ref, ray.get(ref, timeout=timeout))
                    del refs[w]
                except WORKER_FAULTS as e:
                    self.restart_worker(w, f"died during step {step} ({type(e).__name__})")
                    refs[w] = self.sample_part(step, w, handed)
                except RayTaskError as e:
                    raise task_failure(f"rollout of step {step}", e) from None
        for w, (_, batch) in done.items():
            self.check_version(step, w, batch)
        batches = [done[w][1] for w in range(n)]
        if (failure := self.reward_failure(step, batches)) is not None:
            raise failure
        return [done[w][0] for w in range(n)], batches

    def reward_failure(self, step: int, batches: list[pa.RecordBatch]) -> RewardFailure | None:
        """The error that stops the run where the reward functions failed on every sample of step `step` (its
        rollout `batches`, all of them; see `rewards.step_failure`), else None."""
        why = step_failure(self.cfg.task.name, batches)
        return None if why is None else RewardFailure(f"rollout of step {step} failed: RewardError: {why}")

    def check_version(self, step: int, wid: int, batch: pa.RecordBatch, version: int | None = None) -> None:
        """Raise TrainingError unless worker `wid` sampled its share of `step` with the version it was handed
        (`version`; None: the trainer's current one, as in sync mode)."""
        version = self.version if version is None else version
        held = set(batch.column("policy_version").unique().to_pylist())
        if held - {version}:
            raise TrainingError(f"rollout worker {wid} sampled step {step} with policy version(s) {sorted(held)} "
                                f"after being handed version {version}")

    def run(self, start_step: int = 0) -> dict:
        cfg = self.cfg
        recent = deque(maxlen=STOP_WINDOW)  # rewards of the last steps, for run.stop_reward
        if start_step > 0:
            state, run_state = checkpoint.load(checkpoint.latest(self.run_dir))
            wait(self.learner.load_state.remote(state), cfg.ray.timeout_s, "loading the checkpoint into the learner")
            recent.extend(run_state.get("recent_rewards", []))
        weights_ref = self.learner.get_weights.remote()
        version = wait(self.learner.get_version.remote(), cfg.ray.timeout_s, "asking the learner its version")
        self.broadcast(weights_ref, version)

        self.open_outputs(start_step)
        steps = self.async_steps(start_step, version) if cfg.run.mode == "async" else self.sync_steps(start_step)
        record: dict = {}
        step = evaluated = start_step
        try:
            for record in steps:
                step = record["step"]
                if not np.isnan(record["rollout/reward_mean"]):  # a step no sample of which was scored has none
                    recent.append(record["rollout/reward_mean"])
                if cfg.run.eval_every is not None and step % cfg.run.eval_every == 0:
                    evaluated = self.evaluate(step)
                if cfg.run.max_time_s is not None and time.perf_counter() - self.t_start >= cfg.run.max_time_s:
                    print(f"run.max_time_s={cfg.run.max_time_s:g} reached; stopping at step {step}", flush=True)
                    break
                if stop_reward_reached(cfg, recent):
                    print(f"mean reward of the last {len(recent)} steps reached run.stop_reward="
                          f"{cfg.run.stop_reward}; stopping at step {step}", flush=True)
                    break
                if step % cfg.run.checkpoint_every == 0 and step < cfg.run.steps:
                    self.save(step, {"recent_rewards": list(recent)})
            steps.close()
            if cfg.run.eval_every is not None and evaluated < step:  # the policy the run ends with
                self.evaluate(step)
            self.save(step, {"recent_rewards": list(recent)})  # with the window: see ended_run
        except RewardFailure as e:  # a broken reward function (a service down): keep every step learned so far
            if step == 0:
                raise
            if step > start_step and step % cfg.run.checkpoint_every:  # not checkpointed yet
                self.save(step, {"recent_rewards": list(recent)})
            raise TrainingError(str(e), last_step=step) from None
        finally:
            if self.writer is not None:
                self.writer.flush()
            self.logger.close()
        return {"steps": step, "final_reward": record.get("rollout/reward_mean"), "run_dir": str(self.run_dir)}

    def evaluate(self, step: int) -> int:
        """run.eval_every: the learner's policy scored on the held-out prompts (greedy, as `distpg eval`), into
        eval.jsonl, TensorBoard and a console line. The version scored is `step`'s, in async mode too: the loop
        gets a step's record only once its update is done and issues the next update after this call returns,
        so none is in flight (a resume forgets the evaluations past its checkpoint and redoes them with the
        steps, see `_prepare_run_dir`). A reward function that fails on every held-out prompt is reported, and
        training goes on. Returns the version scored (or `step`). The wait grows with the prompts: `eval_wait`."""
        if self.eval_timeout is None:  # counted once: a test file is read again for it
            self.eval_timeout = eval_wait(self.cfg, *eval_prompts(self.cfg, self.task))
        timeout, why = self.eval_timeout
        try:
            res = wait(self.learner.evaluate.remote(), timeout, f"the evaluation after step {step}", why=why)
        except RewardFailure as e:
            print(f"distpg: {e}; training goes on", flush=True)
            return step
        self.logger.log_eval(step, res)
        return res["version"]

    def open_outputs(self, start_step: int) -> None:
        """Metrics logger, rollout writer and the busy-time counters of a run starting after `start_step`."""
        cfg = self.cfg
        self.logger = MetricsLogger(self.run_dir, cfg.run.steps, cfg.log.tensorboard, cfg.log.print_every,
                                    start_step=start_step, stop_reward=cfg.run.stop_reward,
                                    max_time_s=cfg.run.max_time_s)
        self.writer = RolloutWriter(self.run_dir / "rollouts", cfg.log.rollout_flush_every) if cfg.log.rollouts \
            else None
        self.t_start, self.worker_busy_s, self.learner_busy_s = time.perf_counter(), 0.0, 0.0
        # `say_failed`, `say_not_scored`: when each kind of warning was said last
        self.failures, self.unscored = Throttle(cfg.log.print_every), Throttle(cfg.log.print_every)
        ledger = self.run_dir / LEDGER
        if cfg.log.ledger and start_step and ledger.exists():  # cut to the checkpoint by prepare_run_dir
            import pyarrow.parquet as pq

            self.ledger_base = pq.read_table(ledger)

    # ------------------------------------------------------------------------------------ sync mode
    def sync_steps(self, start_step: int):
        """Synchronous loop: each step waits for every worker, then the learner."""
        for step in range(start_step + 1, self.cfg.run.steps + 1):
            yield self.sync_step(step)

    def sample_part(self, step: int, wid: int, weights=None):
        """Issue worker `wid`'s share of step `step` (its prompts and seed depend only on seed, step, wid),
        handing it `weights` to load first (None: it samples with the version it holds)."""
        prompts, ids = step_prompts(self.task, self.cfg, step)
        n = len(self.workers)
        return self.workers[wid].sample.remote(split(prompts, n)[wid], split(ids, n)[wid],
                                               sample_seed(self.cfg.run.seed, step, wid), weights)

    def sync_step(self, step: int) -> dict:
        """One synchronous step: sample (with the weights of the previous update, handed along with the sample
        calls: no round trip of their own), update, log.

        perf/rollout_s runs from issuing the sample calls to the last batch; perf/sync_s is the longest any
        worker spent fetching and loading the weights at the start of its call (a part of perf/rollout_s);
        perf/learn_s runs from issuing the update to its metrics; perf/step_s is their sum."""
        cfg = self.cfg
        if self.single_call:
            return self.single_call_step(step)
        t0 = time.perf_counter()
        refs, batches = self.collect(step)
        t1 = time.perf_counter()
        metrics_ref, weights_ref = self.learner.update.options(num_returns=2).remote(*refs)
        if self.writer is not None:  # while the learner works
            self.writer.add(step, batches)
        lm = wait(metrics_ref, cfg.ray.timeout_s, f"learner update of step {step}")
        t2 = time.perf_counter()
        self.weights_ref, self.version = weights_ref, lm["policy/version"]  # go out with the next sample calls
        timing = {"perf/step_s": t2 - t0, "perf/rollout_s": t1 - t0, "perf/learn_s": t2 - t1,
                  "perf/sync_s": sync_seconds(batches)}
        return self.log_step(step, batches, lm, timing)

    def single_call_step(self, step: int) -> dict:
        """The synchronous step when the only worker runs in the learner (rollout.colocate, one worker): one
        call samples and learns. perf/rollout_s is the worker's time in it (loading the weights, generating,
        scoring), perf/learn_s the rest of the step (the update and the call's round trip)."""
        cfg = self.cfg
        prompts, ids = step_prompts(self.task, cfg, step)
        t0 = time.perf_counter()
        refs = self.learner.step.options(num_returns=2).remote(prompts, ids, sample_seed(cfg.run.seed, step, 0))
        try:
            batch, lm = wait(refs, cfg.rollout.timeout_s + cfg.ray.timeout_s,
                             f"step {step} (sampling and update in the learner's actor)", passthrough=WORKER_FAULTS)
        except WORKER_FAULTS as e:
            self.restart_worker(0, f"died during step {step} ({type(e).__name__})")  # raises: it is the learner
        step_s = time.perf_counter() - t0
        self.check_version(step, 0, batch)
        self.version = lm["policy/version"]
        self.weights_ref = None  # nothing is published: no other worker needs weights (frees the first version)
        if self.writer is not None:
            self.writer.add(step, [batch])
        rollout_s = call_seconds(batch)
        timing = {"perf/step_s": step_s, "perf/rollout_s": rollout_s, "perf/learn_s": step_s - rollout_s,
                  "perf/sync_s": sync_seconds([batch])}
        return self.log_step(step, [batch], lm, timing)

    # ----------------------------------------------------------------------------------- async mode
    def async_steps(self, start_step: int, version: int):
        """Asynchronous loop with bounded staleness; see `AsyncPipeline`."""
        pipeline = AsyncPipeline(self, start_step, version)
        try:
            while pipeline.next_update <= self.cfg.run.steps:
                record = pipeline.advance()
                if record is not None:
                    yield record
        except GeneratorExit:  # the run stops (run.stop_reward, run.max_time_s) at the step just logged
            if pipeline.failure is not None:  # held for that step's record: said, not dropped
                print(f"distpg: warning: {pipeline.failure} (a step after the one the run stops at)", flush=True)
            raise

    # -------------------------------------------------------------------------------------- logging
    def say_failed(self, step: int, batches: list[pa.RecordBatch]) -> None:
        """A warning for a step some of whose rewards failed (raised, returned no number, timed out: masked, no
        gradient), naming the first failure: a reward function that raised on 40% of the samples trained on
        silently, its error kept nowhere (a helper's trial). Said at the first such step, and again where the
        error's type changes or log.print_every steps have gone by, with the count of the failures in between.
        (A step no reward of which was scored because the functions failed stops the run: `reward_failure`.)"""
        failed = sum(b.num_rows - int(pc.sum(b.column("reward_ok")).as_py() or 0)
                     - int((b.schema.metadata or {}).get(b"not_scored", 0)) for b in batches)
        if not failed:
            return
        total = sum(b.num_rows for b in batches)
        where, error = failure_in(batches) or ("", "")
        # kind: the exception's type (its message may name the sample), or the fault
        if (since := self.failures.due(step, failed, error.split(":", 1)[0])) is None:
            return
        first = f"; the first {where}: {error}" if where else ""
        print(f"distpg: warning: step {step}: the reward failed for {failed} of its {total} samples{since}; they are "
              f"masked and carry no gradient (rollout/failed_rewards){first}", flush=True)

    def log_step(self, step: int, batches: list[pa.RecordBatch], lm: dict, timing: dict) -> dict:
        cfg = self.cfg
        say_not_scored(step, batches, self.unscored)
        self.say_failed(step, batches)
        stats = rollout_stats(batches)
        rollout_tokens = stats.pop("_tokens")
        self.worker_busy_s += sum(_meta_seconds(b) for b in batches)
        self.learner_busy_s += lm["perf/learner_compute_s"]
        if self.placement.colocated:  # the learner's actor also sampled worker 0's share
            self.learner_busy_s += _meta_seconds(batches[0])
        elapsed = time.perf_counter() - self.t_start
        metrics = {
            **stats,
            **lm,
            **timing,
            "perf/rollout_tokens_per_s": rollout_tokens / timing["perf/rollout_s"],
            "perf/worker_idle_frac": max(0.0, 1.0 - self.worker_busy_s / (len(self.workers) * elapsed)),
            "perf/learner_idle_frac": max(0.0, 1.0 - self.learner_busy_s / elapsed),
            "workers/alive": len(self.workers),
            "workers/restarts": self.restarts,
            "workers/nodes": len(set(self.worker_nodes)),
        }
        samples = None
        if cfg.log.samples and (step % cfg.log.sample_every == 0 or step == 1):
            samples = sample_texts(batches, cfg.log.samples, cfg.rollout.group_size)
        return self.logger.log(step, metrics, samples)

    def write_ledger(self) -> None:
        """RUN_DIR/ledger.parquet (whole, atomically): the ledger of the steps before a resume, then the
        learner's."""
        rows = wait(self.learner.get_ledger.remote(), self.cfg.ray.timeout_s, "fetching the learner's ledger")
        cols = list(zip(*rows)) if rows else [[], [], []]
        table = pa.table({"prompt_id": pa.array(cols[0], pa.int64()), "sample_idx": pa.array(cols[1], pa.int32()),
                          "version": pa.array(cols[2], pa.int64())})
        if self.ledger_base is not None:
            table = pa.concat_tables([self.ledger_base, table])
        write_table(table, self.run_dir / LEDGER)

    def save(self, step: int, run_state: dict | None = None) -> None:
        """Checkpoint `step`; with log.ledger, the ledger first (a resume cuts it to its checkpoint), and the
        rollouts not yet flushed, so that an interrupted run keeps the ledger and rollouts of the steps it does
        not redo."""
        if self.cfg.log.ledger:
            self.write_ledger()
        if self.writer is not None:
            self.writer.save_unflushed()
        state = wait(self.learner.state.remote(), self.cfg.ray.timeout_s, "fetching the learner state")
        checkpoint.save(self.run_dir, step, state, self.cfg.run.keep_checkpoints, run_state)

    def close(self, remove_group: bool = True) -> None:
        """Kill the actors and (with `remove_group`) remove the placement group: a call to the GCS, which waits
        on it; a local runtime about to be stopped takes the group with it."""
        for actor in [self.learner, *(w for w in self.workers if w is not self.learner)]:
            ray.kill(actor)
        if remove_group:
            remove_placement_group(self.pg)


WORKER_FAULTS = (RayActorError, WorkerCrashedError, OutOfMemoryError, ObjectLostError, NodeDiedError)


def _threads(cpus: float) -> int:
    """torch threads for an actor given `cpus` CPUs."""
    return max(1, round(cpus))


def _node_of(actor):
    return actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())


def _meta_seconds(batch: pa.RecordBatch, keys: tuple[bytes, ...] = (b"gen_s", b"reward_s")) -> float:
    """Seconds a worker spent on a batch (by default generation + rewards), from the batch's schema metadata."""
    meta = batch.schema.metadata or {}
    return sum(float(meta.get(k, 0)) for k in keys)


def call_seconds(batch: pa.RecordBatch) -> float:
    """A worker's whole time in the sample call that made `batch`: loading the weights, generating, scoring."""
    return _meta_seconds(batch, (b"sync_s", b"gen_s", b"reward_s"))


def sync_seconds(batches: list[pa.RecordBatch]) -> float:
    """perf/sync_s: the longest any worker spent fetching and loading the weights handed with its call."""
    return max(_meta_seconds(b, (b"sync_s",)) for b in batches)


def describe_run(cfg: Config, trainer: Trainer, placement: Placement, resources: dict, local: bool) -> str:
    where = "local Ray" if local else "Ray cluster"
    m = cfg.model
    return (
        f"distpg: {cfg.rollout.num_workers} rollout worker{'s' if cfg.rollout.num_workers != 1 else ''} on "
        f"{len(set(trainer.worker_nodes))} node(s) + 1 learner, "
        f"{where} with {resources.get('CPU', 0):g} CPUs / {resources.get('GPU', 0):g} GPUs "
        f"({'GPU' if placement.use_gpu else 'CPU'} training); task {cfg.task.name}; model {m.n_layer}x{m.n_embd}; "
        f"{cfg.rollout.prompts_per_step} prompts x {cfg.rollout.group_size} samples per step; "
        f"baseline {cfg.algo.baseline}; {cfg.run.steps} steps; mode {cfg.run.mode}"
        + (f" (max_staleness {cfg.algo.max_staleness}, {cfg.algo.off_policy})" if cfg.run.mode == "async" else "")
        + (f"; workers sample in {cfg.rollout.dtype}" if cfg.rollout.dtype != "float32" else "")
        + (f"; the learner trains in {cfg.learner.dtype} mixed precision" if cfg.learner.dtype != "float32" else "")
        + ("; rollout worker 0 runs in the learner's actor (rollout.colocate)" if placement.colocated else "")
    )


class AsyncPipeline:
    """The asynchronous schedule: workers generate ahead of the learner, never more than K versions behind.

    Worker w may start step s once it has been handed weights of version >= s - 1 - K (K =
    algo.max_staleness): the learner consumes step s at version s - 1, so no batch is ever more than K
    versions old and nothing generated is thrown away. Workers queue up to two calls, so they go straight
    from one batch to the next. Each new version goes to a worker with the next sample call issued to it
    (one object, N readers, no call of its own): a worker's calls run in order, so that call is the first
    to sample after the update either way.
    With K = 0 this is the synchronous schedule exactly: same prompts, seeds, versions and numbers. With
    algo.staleness_schedule=exact every step s is sampled with version max(v0, s - 1 - K) (v0: the run's first),
    never a newer one, so the numbers do not depend on timing either: the published versions that steps still
    to be sampled need are kept (at most K + 1 of them).
    A worker that dies, or holds a share longer than rollout.timeout_s, is replaced and its unfinished
    shares are reissued with the same prompts and seeds.
    """

    def __init__(self, trainer: Trainer, start_step: int, version: int) -> None:
        self.t, self.cfg = trainer, trainer.cfg
        n = len(trainer.workers)
        self.next_step = [start_step + 1] * n  # the next step each worker will sample
        self.handed = [version] * n  # newest weights version handed to each worker (calls run in order)
        self.version = version
        self.exact, self.first_version = self.cfg.algo.staleness_schedule == "exact", version
        self.refs = {version: trainer.weights_ref}  # exact: version -> its published weights, while needed
        self.pending: dict = {}  # ObjectRef -> ("sample", step, worker, t_started, version) | ("update",); t_started:
        # when the call was issued, or when the call before it on that worker ended, if later (it waited in its
        # queue); version: the policy version the call samples with
        self.parts: dict[int, dict[int, tuple]] = {}  # step -> worker -> (ref, batch)
        self.rollout_t: dict[int, float] = {}  # step -> first issue time, then its rollout seconds
        self.update = None  # (step, metrics_ref, weights_ref, t_launch) of the update in flight
        self.next_update, self.t_prev = start_step + 1, time.perf_counter()
        self.failure: Exception | None = None  # a share's error, raised once the update in flight is logged

    def in_flight(self, w: int) -> list[int]:
        return [k[1] for k in self.pending.values() if k[0] == "sample" and k[2] == w]

    def version_for(self, s: int) -> int:
        """exact: the version step s is sampled with."""
        return max(self.first_version, s - 1 - self.cfg.algo.max_staleness)

    def issue(self, s: int, w: int) -> None:
        """Issue worker w's share of step s, handing it the newest weights (exact: those of
        `version_for(s)`) unless it has them already."""
        want = self.version_for(s) if self.exact else self.version
        weights = None
        if self.handed[w] < want:
            weights, self.handed[w] = [self.refs[want] if self.exact else self.t.weights_ref], want
        # the version the call samples with: the worker runs its calls in order, loading what each one carries
        self.pending[self.t.sample_part(s, w, weights)] = ("sample", s, w, time.perf_counter(), self.handed[w])
        self.rollout_t.setdefault(s, time.perf_counter())

    def advance(self) -> dict | None:
        """Issue what the bound allows, wait for one result, handle it; returns a step's record or None."""
        cfg, n, K = self.cfg, len(self.t.workers), self.cfg.algo.max_staleness
        if self.failure is not None:  # nothing more is issued: the update in flight is logged, then the run stops
            if self.update is None:
                raise self.failure from None
            self.pending.pop(self.update[1], None)
            return self.on_update()
        for w in range(n):
            while len(self.in_flight(w)) < 2 and self.next_step[w] <= cfg.run.steps and \
                    self.version >= self.next_step[w] - 1 - K:  # the version the call will carry
                self.issue(self.next_step[w], w)
                self.next_step[w] += 1
        if self.update is None and len(self.parts.get(self.next_update, {})) == n:
            refs = [self.parts[self.next_update][w][0] for w in range(n)]
            metrics_ref, weights_ref = self.t.learner.update.options(num_returns=2).remote(*refs)
            self.update = (self.next_update, metrics_ref, weights_ref, time.perf_counter())
            self.pending[metrics_ref] = ("update",)
        ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=min(5.0, cfg.rollout.timeout_s))
        if not ready:
            self.replace_hung()
            return None
        ref = ready[0]
        kind = self.pending.pop(ref)
        if kind[0] == "sample":
            now = time.perf_counter()  # the worker's share queued behind this one starts now: so does its clock
            for r, k in self.pending.items():
                if k[0] == "sample" and k[2] == kind[2]:
                    self.pending[r] = (*k[:3], max(k[3], now), *k[4:])
            self.on_sample(ref, kind[1], kind[2], kind[4])
        else:
            return self.on_update()
        return None

    def on_sample(self, ref, s: int, w: int, version: int) -> None:
        try:
            batch = ray.get(ref, timeout=self.cfg.ray.timeout_s)
            # a batch of another version than the call carried would break the staleness bound (or, with the
            # exact schedule, the repeatable numbers) unseen: the learner takes any version up to its own
            self.t.check_version(s, w, batch, version)
        except WORKER_FAULTS as e:
            self.replace(w, f"died during step {s} ({type(e).__name__})", also=[s])
            return
        except (RayTaskError, TrainingError) as e:
            self.failure = task_failure(f"rollout of step {s}", e) if isinstance(e, RayTaskError) else e
            if self.update is None:
                raise self.failure from None
            return  # the learner is applying the update of an earlier step: its record comes first (see advance)
        self.parts.setdefault(s, {})[w] = (ref, batch)
        if len(self.parts[s]) == len(self.t.workers):
            self.rollout_t[s] = time.perf_counter() - self.rollout_t[s]
            failure = self.t.reward_failure(s, [self.parts[s][k][1] for k in range(len(self.t.workers))])
            if failure is not None:  # as a share's error above
                self.failure = failure
                if self.update is None:
                    raise failure from None

    def on_update(self) -> dict:
        s, metrics_ref, weights_ref, t_launch = self.update
        lm = wait(metrics_ref, self.cfg.ray.timeout_s, f"learner update of step {s}")
        now = time.perf_counter()
        self.version, self.t.weights_ref = lm["policy/version"], weights_ref  # out with the next calls
        if self.exact:
            self.refs[self.version] = weights_ref
            need = min(self.version_for(k) for k in self.next_step + [k[1] for k in self.pending.values()
                                                                       if k[0] == "sample"])
            self.refs = {v: r for v, r in self.refs.items() if v >= need}
        batches = [self.parts[s][w][1] for w in range(len(self.t.workers))]
        if self.t.writer is not None:
            self.t.writer.add(s, batches)
        timing = {"perf/step_s": now - self.t_prev, "perf/rollout_s": self.rollout_t.pop(s),
                  "perf/learn_s": now - t_launch,
                  "perf/sync_s": sync_seconds(batches)}
        del self.parts[s]
        self.update, self.next_update, self.t_prev = None, self.next_update + 1, now
        return self.t.log_step(s, batches, lm, timing)

    def replace_hung(self) -> None:
        now, timeout = time.perf_counter(), self.cfg.rollout.timeout_s
        for kind in list(self.pending.values()):
            if kind[0] == "sample" and now - kind[3] > timeout:
                self.replace(kind[2], f"held its share of step {kind[1]} longer than {timeout:g}s")
                return
        if self.update is not None and now - self.update[3] > self.cfg.ray.timeout_s:
            raise TrainingError(f"learner update of step {self.update[0]} did not finish within "
                                f"{self.cfg.ray.timeout_s:g}s")

    def replace(self, w: int, reason: str, also: list[int] = ()) -> None:
        """Replace worker w and reissue its unfinished shares (and `also`) with the current weights."""
        lost = sorted(set(also) | set(self.in_flight(w)))
        self.pending = {r: k for r, k in self.pending.items() if not (k[0] == "sample" and k[2] == w)}
        if self.exact:  # the replacement starts from the version its first share needs
            first = lost[0] if lost else self.next_step[w]
            self.handed[w] = min(self.version, self.version_for(first))  # published: a lost share's always is
            self.t.restart_worker(w, reason, self.refs[self.handed[w]])
        else:
            self.t.restart_worker(w, reason)
            self.handed[w] = self.version
        for s in lost:
            self.issue(s, w)


class Throttle:
    """When to say a warning that may hold for many steps: at the first step with some, then again once `every`
    steps (log.print_every) have gone by or the kind changes (a new error type), counting what went unsaid."""

    def __init__(self, every: int) -> None:
        self.every, self.said, self.kind, self.unsaid = every, None, None, 0

    def due(self, step: int, count: int, kind: str = "") -> str | None:
        """Step `step` has `count` of the warning's cases: None where it is not to be said now, else what the
        warning adds: '' or ' (N in all since step S's warning)'."""
        self.unsaid += count
        if self.said is not None and kind == self.kind and step - self.said < self.every:
            return None
        since = "" if self.said is None or self.unsaid == count else \
            f" ({self.unsaid} in all since step {self.said}'s warning)"
        self.said, self.kind, self.unsaid = step, kind, 0
        return since


def say_not_scored(step: int, batches: list[pa.RecordBatch], throttle: Throttle) -> None:
    """A step's samples that no reward function scored (each returned None: it does not apply) are masked, as
    failed ones (`reward_ok` false, in `rollout/failed_rewards`, no gradient); said with a warning, as TRL warns
    where every function returned None (at the first such step and as `throttle` says after it: a function that
    applies to half the prompts said so at every step), and the run goes on. Where not one sample of the run's
    first step was scored, the functions return nothing at all (a forgotten `return`, which returns None):
    TrainingError. Only the first step is checked so: a later step whose samples none applies to is a warning,
    and a resumed run, which never redoes the first step, goes on where the uninterrupted one went on."""
    n = sum(int((b.schema.metadata or {}).get(b"not_scored", 0)) for b in batches)
    total = sum(b.num_rows for b in batches)
    if n == total and step == 1:
        raise TrainingError(f"every reward function returned None for all {total} samples of the run's first "
                            "step: a function that forgot its `return` does that. None says that a function does "
                            "not apply to a sample (TRL's convention), and none applied to any of them: return a "
                            "number for the samples a function scores (if they apply to so few prompts that a "
                            "step can miss them all, another run.seed draws another first step)")
    if n and (since := throttle.due(step, n)) is not None:
        print(f"distpg: warning: step {step}: {n} of its {total} samples got no reward{since} (every reward "
              "function returned None: none applies to them); they are masked and carry no gradient", flush=True)


def sample_texts(batches: list[pa.RecordBatch], n: int, group_size: int) -> list[tuple[str, str, float]]:
    """`n` of a step's samples as (prompt, completion, reward), for TensorBoard's text: the first sample of each
    prompt in turn, then the second..., so that they show as many prompts as `n` allows (the first `n` rows were
    all one prompt's group: four answers to one question)."""
    table = pa.Table.from_batches(batches)  # prompt-major: row i is sample i % G of prompt i // G
    rows = sorted(range(table.num_rows), key=lambda i: (i % group_size, i))[:n]
    picked = table.take(rows).select(["prompt_text", "completion_text", "reward"]).to_pydict()
    return list(zip(picked["prompt_text"], picked["completion_text"], picked["reward"]))


def rollout_stats(batches: list[pa.RecordBatch]) -> dict:
    table = pa.Table.from_batches(batches)
    reward = table.column("reward").to_numpy()
    ok = table.column("reward_ok").to_numpy()
    lengths = pc.list_value_length(table.column("completion_tokens")).to_numpy()
    r = reward[ok]
    return {
        "rollout/reward_mean": float(r.mean()) if len(r) else float("nan"),
        "rollout/reward_std": float(r.std()) if len(r) else float("nan"),
        "rollout/length_mean": float(lengths.mean()),
        "rollout/failed_rewards": int((~ok).sum()),
        "rollout/truncated_frac": float(table.column("truncated").to_numpy().mean()),
        **reward_part_stats(table),
        "_tokens": int(lengths.sum()),
    }


def reward_part_stats(table: pa.Table) -> dict:
    """With several reward functions: each one's mean and std over the samples it scored (its `reward/NAME`
    column, null where it returned None or failed), as TRL logs rewards/NAME/mean and std; NaN where it scored
    none."""
    out = {}
    for name in table.column_names:
        if name.startswith("reward/"):
            v = table.column(name).drop_null().to_numpy()
            out[f"rollout/rewards/{name[len('reward/'):]}/mean"] = float(v.mean()) if len(v) else float("nan")
            out[f"rollout/rewards/{name[len('reward/'):]}/std"] = float(v.std()) if len(v) else float("nan")
    return out


LOCK = ".lock"  # in the run folder: held (flock) by the process training in it
LEDGER = "ledger.parquet"  # in the run folder, with log.ledger


def lock_run_dir(run_dir: Path):
    """Create the run folder if missing and take its lock, so that no second `distpg train` (a job submitted
    twice, a --resume of a run still going) writes into it at the same time. Returns the open lock file: the
    lock holds until it is closed or the process ends, however it ends. Raises ConfigError, naming the holder,
    when another process holds it. flock: local filesystems, and NFS (Linux emulates it with POSIX locks)."""
    import fcntl
    import socket

    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK, "a+")  # noqa: SIM115 - held open for the run's life
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(f"run folder {str(run_dir)!r} is in use by {holder}; wait for that run to end (or stop "
                          "it), or pick another --run-dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"distpg train (pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
    f.flush()
    return f


PROVENANCE = "provenance.jsonl"


def _git_commit(package_dir: Path) -> tuple[str | None, bool | None]:
    """The commit of the git checkout distpg runs from and whether its tracked files differ from it; (None,
    None) when it does not run from one (installed from a wheel, a job's copy without .git, no git)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(package_dir), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        # the checkout must be distpg's own, not one that merely holds a virtualenv it is installed in
        if Path(git("rev-parse", "--show-toplevel")).resolve() != package_dir.parent.resolve():
            return None, None
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None


def provenance(start_step: int) -> dict:
    """What made a run's numbers besides its config and seed, as one line of RUN_DIR/provenance.jsonl: the
    code (distpg's version, its git commit and whether the checkout had changes), the versions of the
    libraries the numbers depend on, the command line and the machine. A resumed run adds a line, from
    `start_step`."""
    import importlib.metadata
    import platform
    import socket
    import sys

    import torch

    import distpg

    commit, dirty = _git_commit(Path(distpg.__file__).resolve().parent)
    try:
        version = importlib.metadata.version("distpg")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was not installed
        version = None
    return {"start_step": start_step, "time": time.strftime("%Y-%m-%d %H:%M:%S %z"), "distpg": version,
            "git_commit": commit, "git_dirty": dirty, "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "numpy": np.__version__, "pyarrow": pa.__version__,
            "argv": sys.argv, "cwd": os.getcwd(), "host": socket.gethostname(), "platform": platform.platform()}


def prepare_run_dir(cfg: Config, run_dir: Path, resume: bool, shapes: dict | None = None) -> int:
    """Write the resolved config of a new run in its (locked) folder; on resume, return the step to continue
    from, after forgetting what the interrupted run logged past it. Either way add a line of `provenance`.
    On resume the checkpoint is checked first (`checkpoint.check`, against the policy's tensor `shapes` if
    given): CheckpointError, with nothing changed, where it cannot be read or does not fit the config."""
    start = _prepare_run_dir(cfg, run_dir, resume, shapes)
    import json

    import yaml

    # config.yaml as this start reads it: the README has users edit it to train on (run.steps), and an edit
    # of anything else changes the numbers from `start` on, which the folder would not show otherwise
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    path = run_dir / PROVENANCE
    before = None
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            before = json.loads(line).get("config", before)
        except json.JSONDecodeError:  # a line cut off by a kill: the file is a record, not the run's state
            pass
    changed = _changes(before, config) if before is not None else []
    if changed:
        print(f"distpg: {run_dir / 'config.yaml'} changed since the run's last start: {', '.join(changed)}; "
              f"the steps from {start + 1} on run with the new values ({PROVENANCE} keeps both)", flush=True)
    missing = _missing(cfg.to_dict(), config) if resume else []
    if missing:
        print(f"distpg: {run_dir / 'config.yaml'} has no {', '.join(name for name, _ in missing)} (added to "
              f"distpg since the run started): from step {start + 1} on they take their defaults, "
              f"{', '.join(f'{name} = {value!r}' for name, value in missing)}; set them in config.yaml to choose",
              flush=True)
    with open(path, "a") as f:
        f.write(json.dumps({**provenance(start), "config": config}) + "\n")
    if resume:
        print(f"distpg: resuming at step {start + 1} from the checkpoint of step {start}" if start else
              "distpg: resuming from step 0: the run has no checkpoint yet", flush=True)
    return start


def _missing(resolved: dict, written: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(path, value) of each field of the resolved config that the written one (a run's config.yaml) lacks."""
    out = []
    for key, value in resolved.items():
        if key not in written:
            out.append((f"{prefix}{key}", value))
        elif isinstance(value, dict) and isinstance(written[key], dict):
            out += _missing(value, written[key], f"{prefix}{key}.")
    return out


def _changes(before: dict, after: dict, prefix: str = "") -> list[str]:
    """'path: old -> new' for each field that differs between two nested config dicts."""
    out = []
    for key in sorted(set(before) | set(after), key=str):
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _prepare_run_dir(cfg: Config, run_dir: Path, resume: bool, shapes: dict | None) -> int:
    if not resume:
        if (run_dir / "metrics.jsonl").exists():
            raise ConfigError(f"run folder {str(run_dir)!r} already holds a run; use --resume {run_dir} to "
                              "continue it or pick another --run-dir")
        own = run_dir / "config.yaml"
        if own.is_file() and not own.read_text(errors="replace").startswith(RUN_ORIGIN):
            # not one a run wrote (that of a run stopped before its first step is rewritten): the user's own
            # file, such as the CONFIG of `distpg train exp/config.yaml --run-dir exp`
            raise ConfigError(f"run folder {str(run_dir)!r} holds a config.yaml that distpg did not write (your "
                              "CONFIG?); a run writes its resolved config there and would overwrite it: pick "
                              "another --run-dir, or move the file")
        own.write_text(dump_run_config(cfg))
        snapshot_prompts(cfg, run_dir)
        if cfg.model.init_from:
            from distpg.hf import snapshot_base

            snapshot_base(cfg.model.init_from, run_dir)
        return 0
    ckpt = checkpoint.latest(run_dir)
    if ckpt is not None:
        checkpoint.check(ckpt, shapes)
        if (named := checkpoint.named_latest(run_dir)) != ckpt.name:
            print(f"distpg: {run_dir / 'checkpoints' / 'latest'} names "
                  + (f"{named}, which is missing or incomplete" if named else "no checkpoint (the file is missing)")
                  + f"; resuming from {ckpt.name}, the newest complete checkpoint", flush=True)
    # no checkpoint yet (stopped before run.checkpoint_every): it starts over from step 0, as it began
    start = 0 if ckpt is None else int(checkpoint.run_state(ckpt)["step"])
    if ckpt is None:
        shutil.rmtree(run_dir / "tb", ignore_errors=True)  # every step in it is redone
    # forget what the interrupted run logged after its last checkpoint
    if (run_dir / "metrics.jsonl").exists():
        cut_records(run_dir / "metrics.jsonl", "step", start)
    if (run_dir / EVALS).exists():  # run.eval_every: the evaluations of the policies the resume does not redo
        # (an evaluation's version is its step: `Trainer.evaluate`)
        cut_records(run_dir / EVALS, "version", start)
    # the rollouts buffered at its latest checkpoint, unless the flush that followed wrote them to their file
    unflushed = run_dir / "rollouts" / UNFLUSHED
    if unflushed.exists():
        import pyarrow.parquet as pq

        steps = pq.read_table(unflushed, columns=["step"]).column("step")
        first, last = pc.min(steps).as_py(), pc.max(steps).as_py()
        if any(unflushed.parent.glob(f"steps_{first:06d}-*.parquet")):
            unflushed.unlink()
        else:
            unflushed.rename(unflushed.with_name(f"steps_{first:06d}-{last:06d}.parquet"))
    # and its rollouts after that step: they will be generated again
    for f in (run_dir / "rollouts").glob("steps_*.parquet"):
        first, last = (int(x) for x in f.stem.split("_")[1].split("-"))
        if first > start:
            f.unlink()
        elif last > start:
            _cut_table(f, "step", start, f.with_name(f"steps_{first:06d}-{start:06d}.parquet"), compression="zstd")
            f.unlink()
    # and its ledger's rows after that step (an update's version is its step)
    if (run_dir / LEDGER).exists():
        _cut_table(run_dir / LEDGER, "version", start)
    return start


def _cut_table(path: Path, column: str, last: int, out: Path | None = None, **options) -> None:
    """The rows of the Parquet file `path` whose `column` is at most `last`, written whole to `out` (default:
    over `path`)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    write_table(table.filter(pc.less_equal(table.column(column), last)), out or path, **options)


STOP_WINDOW = 5  # run.stop_reward compares the mean reward of this many last steps (those with a reward)


def stop_reward_reached(cfg: Config, recent) -> bool:
    """Has the mean reward of the last STOP_WINDOW steps (`recent`, oldest first) reached run.stop_reward? A step
    none of whose samples was scored (its rewards all failed, hung, or every function returned None) has no
    reward and is not one of them: it would hold the window's mean at NaN, and the run from stopping, for
    STOP_WINDOW steps."""
    return cfg.run.stop_reward is not None and len(recent) == STOP_WINDOW and np.mean(recent) >= cfg.run.stop_reward


def ended_run(cfg: Config, run_dir: Path) -> dict | None:
    """The summary of a run with nothing left to resume: at its latest checkpoint it has reached run.steps,
    or `stop_reward_reached` (both as its config.yaml says now, so that
    raising them there trains on), with `nothing_to_resume` saying so. None when there is training left."""
    ckpt = checkpoint.latest(run_dir)
    if ckpt is None:
        return None
    state = checkpoint.run_state(ckpt)
    step, recent = int(state["step"]), state.get("recent_rewards", [])
    if step >= cfg.run.steps:
        why = f"run.steps={cfg.run.steps}"
    elif stop_reward_reached(cfg, recent):
        why = (f"mean reward of its last {STOP_WINDOW} steps {np.mean(recent):.3f} >= "
               f"run.stop_reward={cfg.run.stop_reward}")
    else:
        return None
    final = None
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        rows = read_records(metrics)
        final = next((r.get("rollout/reward_mean") for r in reversed(rows) if r["step"] <= step), None)
    return {"steps": step, "final_reward": final, "run_dir": str(run_dir),
            "nothing_to_resume": f"the run ended at step {step} ({why}); to train on, raise run.steps or "
                                 f"run.stop_reward in {run_dir / 'config.yaml'}"}


def train(cfg: Config, run_dir: Path, address: str | None = None, resume: bool = False,
          head_lost: Callable[[], str] | None = None) -> dict:
    """Run a training job end to end. Raises ConfigError (bad config) or TrainingError (run failed).
    `head_lost`: what to tell the user to do when the Ray head node is lost mid-run (`watch_gcs`'s `then`; None:
    this run's resume hint)."""
    task = task_for(cfg)
    validate_with_task(cfg, task)
    for note in inert_settings(cfg):
        print(f"distpg: note: {note}", flush=True)
    address_given = cluster_address(cfg, address)
    if not address_given and not ray.is_initialized():  # a local runtime: check the fit before starting Ray
        import torch

        gpus = torch.cuda.device_count() if cfg.run.device != "cpu" else 0
        cpus = cfg.ray.num_cpus or os.cpu_count()
        plan_placement(cfg, cpus, gpus, nodes=[{"CPU": cpus, "GPU": gpus}])
    run_dir = Path(run_dir)
    created, had_lock = not run_dir.exists(), (run_dir / LOCK).exists()
    lock = lock_run_dir(run_dir)
    try:
        if resume and (summary := ended_run(cfg, run_dir)) is not None:
            return summary
        try:
            shapes = tensor_shapes(policy_shape(cfg.model, task.tokenizer.vocab_size)) if resume else None
            start_step = prepare_run_dir(cfg, run_dir, resume, shapes)
        except (ConfigError, checkpoint.CheckpointError):  # refused before anything was written: leave the folder
            if not had_lock:
                (run_dir / LOCK).unlink(missing_ok=True)
                if created and not any(run_dir.iterdir()):
                    run_dir.rmdir()
            raise
        # resumed from another folder than the one it started in: the actors import the run's task and reward
        # modules from there too, as the driver does (`load_run_config`); a job's workers have its working dir
        origin = run_origin(run_dir) if resume and not in_job_copy() else None
        code_paths = [str(origin)] if origin is not None and origin != Path.cwd() else []
        return _train_in(cfg, run_dir, address, start_step, created, code_paths,
                         head_lost or head_lost_hint(run_dir, cfg.run.steps))
    finally:
        lock.close()


def _train_in(cfg: Config, run_dir: Path, address: str | None, start_step: int, created: bool,
              code_paths: Sequence[str], head_lost: Callable[[], str]) -> dict:
    """`train` in the prepared, locked run folder, from `start_step` (`code_paths`: see `init_ray`; `head_lost`:
    see `watch_gcs`)."""
    print(f"distpg: run folder {run_dir.resolve()}", flush=True)
    started, trainer, handlers, gcs_watch = False, None, None, None
    # a runtime this call starts: stopped at the end, also when a Ctrl-C or SIGTERM lands while it starts (its
    # dashboard and runtime-env agents outlived an interrupted ray.init)
    local = not ray.is_initialized() and not cluster_address(cfg, address)
    SIGNALLED.clear()
    try:
        # before ray.init: a SIGTERM while the runtime starts stops it as Ctrl-C (init_ray keeps them after it)
        handlers = signals_interrupt()
        with ctrl_c_after_it():
            # a caller's runtime is reused
            started = False if ray.is_initialized() else init_ray(cfg, address, code_paths)
        gcs_watch = watch_gcs(head_lost)  # through the cleanup below too, which needs the GCS
        res = ray.cluster_resources()
        placement = plan_placement(cfg, res.get("CPU", 0), res.get("GPU", 0), nodes=cluster_nodes())
        trainer = Trainer(absolute_run_paths(cfg), Path(run_dir), placement)
        print(describe_run(cfg, trainer, placement, res, started), flush=True)
        return trainer.run(start_step)
    except BaseException as e:
        # failed or stopped before its first step was logged (metrics.jsonl is opened, empty, before step 1: a
        # run whose first step failed kept a folder that a second try with the same --run-dir was refused for)
        if created and checkpoint.last_logged_step(run_dir / "metrics.jsonl") is None:
            shutil.rmtree(run_dir, ignore_errors=True)
            ended = "was stopped" if isinstance(e, KeyboardInterrupt) else "failed"  # Ctrl-C, SIGTERM, SIGHUP
            print(f"distpg: removed the run folder {run_dir}: the run {ended} before its first step", flush=True)
        if isinstance(e, KeyboardInterrupt) and (named := as_signalled(e)) is not e:
            raise named from None  # Ray's own, raised on our signal: said as it (143...)
        raise
    finally:
        sigint = said_and_ignored_while_stopping(handlers) if handlers is not None else None
        try:
            if trainer is not None:
                # a signal sent to every process of the job (a scheduler's) also stops the local runtime's GCS:
                # removing the group would wait 60 s on it, then Ray ends the driver (exit 1, no hint)
                trainer.close(remove_group=not started)
            if started or local:
                stop_local_ray()
        finally:
            if gcs_watch is not None:
                gcs_watch.set()
            if handlers is not None:
                put_back({**handlers, **(sigint or {})})
