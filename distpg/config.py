"""Configuration: frozen dataclasses (one per YAML section), loading, `--set` overrides and validation.

Every field has a default and a one-line doc (`doc` in its metadata; `distpg train --help-config` prints
them). Unknown keys, wrong types and impossible combinations raise `ConfigError` naming the field and what
is allowed, before Ray starts. Derived values (model presets) are resolved in `__post_init__`, so the
resolved config written to the run folder is explicit. Nothing mutates a config after loading.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from distpg.model import PRESETS


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type, or inconsistent with another."""


def _f(default, doc: str, choices: tuple | None = None, **kw):
    return field(default=default, metadata={"doc": doc, "choices": choices}, **kw)


@dataclass(frozen=True)
class RunConfig:
    seed: int = _f(0, "seed for model init, prompts and sampling: same config and seed, same numbers")
    steps: int = _f(200, "number of training steps (one batch of rollouts and one update each)")
    mode: str = _f(
        "sync", "sync: rollout, then update, then broadcast; async: workers keep generating while the learner "
        "trains, at most algo.max_staleness versions behind", ("sync", "async"),
    )
    device: str = _f("auto", "auto: GPUs when the cluster has them, else CPU", ("auto", "cpu", "cuda"))
    stop_reward: float | None = _f(
        None, "stop early once the mean reward of the last 5 steps reaches this (steps no sample of which got a "
        "reward are left out; null: run all steps)"
    )
    max_time_s: float | None = _f(None, "stop after this many seconds of training in this start, with a "
                                 "checkpoint (a --resume counts afresh: a time slot per job; null: no limit)")
    checkpoint_every: int = _f(100, "write a checkpoint every this many steps (and always at the end)")
    keep_checkpoints: int = _f(3, "how many of the newest complete checkpoints to keep")
    eval_every: int | None = _f(
        None, "score the learner's policy on the held-out prompts (greedy, as distpg eval) every this many steps "
        "and at the end: RUN_DIR/eval.jsonl and eval/* in TensorBoard (null: off)")


@dataclass(frozen=True)
class TaskConfig:
    name: str = _f("reverse", "built-in task (reverse, sort, addition, prompts) or 'module:attr' of your own")
    length: int = _f(6, "reverse/sort: characters per prompt")
    alphabet: str = _f("abcdef", "reverse/sort: characters the prompts are drawn from")
    digits: int = _f(2, "addition: digits per operand")
    num_eval: int = _f(128, "held-out evaluation prompts, never used for training")
    eval_seed: int = _f(1234, "seed that picks the held-out prompts")
    params: dict = _f(None, "extra parameters for a user task ('module:attr'), passed through as given")
    prompts_path: str | None = _f(
        None, "prompts: a JSONL or Parquet file with a 'prompt' column and an optional 'reference' column")
    reward: str | list | None = _f(
        None, "prompts: 'module:attr' of a function reward(prompt, completion, reference) -> float, or of TRL's "
        "form with a 'completions' parameter; a list of them: a sample's reward is their weighted sum")
    reward_weights: list | None = _f(
        None, "prompts: one weight per task.reward function, in its order (null: 1 each), as TRL's reward_weights")
    max_prompt_tokens: int | None = _f(
        None, "prompts: leave out the rows whose prompt is longer than this many tokens (null: keep every row)")
    eval_prompts_path: str | None = _f(
        None, "prompts: a test file (JSONL or Parquet, as task.prompts_path) whose every prompt run.eval_every "
        "scores instead of the held-out ones, as TRL's eval_dataset (null: the held-out prompts)")


@dataclass(frozen=True)
class ModelConfig:
    preset: str = _f("tiny", "size preset (n_layer x n_embd): " + ", ".join(
        f"{k}={v['n_layer']}x{v['n_embd']}" for k, v in PRESETS.items()), tuple(PRESETS))
    n_layer: int | None = _f(None, "transformer blocks (null: from the preset)")
    n_head: int | None = _f(None, "attention heads (null: from the preset)")
    n_embd: int | None = _f(None, "embedding width (null: from the preset)")
    n_positions: int | None = _f(None, "longest prompt + completion the model can hold (null: 64)")
    init_from: str | None = _f(
        None, "a local Hugging Face GPT-2 folder (config.json, model.safetensors or its shards, tokenizer.json) to "
        "start from: its weights and tokenizer; the shape fields then come from it and the preset is ignored")

    def __post_init__(self) -> None:
        if self.init_from is not None:
            self._shape_from_folder()
            return
        if self.n_positions is None:
            object.__setattr__(self, "n_positions", 64)
        preset = PRESETS.get(self.preset)
        if preset is None:
            raise ConfigError(f"model.preset={self.preset!r}: allowed are {', '.join(PRESETS)}")
        for key, value in preset.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        for key in ("n_layer", "n_head", "n_embd"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key}={getattr(self, key)}: must be at least 1")
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}")

    def _shape_from_folder(self) -> None:
        from distpg.hf import read_shape

        if not self.init_from.strip():
            raise ConfigError("model.init_from='': name a folder, or null to start from a fresh model")
        try:
            shape = read_shape(self.init_from)
        except ValueError as e:
            raise ConfigError(f"model.init_from={self.init_from!r}: {e}") from None
        for key in ("n_layer", "n_head", "n_embd", "n_positions"):
            given, stored = getattr(self, key), getattr(shape, key)
            if given is not None and given != stored:
                raise ConfigError(f"model.{key}={given} but model.init_from={self.init_from!r} has {key}={stored}; "
                                  f"leave model.{key} null")
            object.__setattr__(self, key, stored)


@dataclass(frozen=True)
class RolloutConfig:
    num_workers: int = _f(2, "rollout worker actors")
    prompts_per_step: int = _f(32, "prompts per training step, split across the workers")
    group_size: int = _f(8, "samples per prompt (G)")
    max_new_tokens: int | None = _f(None, "longest completion in tokens (null: the task's own budget)")
    temperature: float = _f(1.0, "sampling temperature, > 0; the learner follows softmax(logits / temperature) too")
    top_k: int = _f(0, "keep only the k most likely tokens (0: off)")
    top_p: float = _f(1.0, "nucleus sampling mass (1.0: off)")
    stop: str | list | None = _f(
        None, "stop strings: a completion ends with the token that completes the first of them in its text (kept "
        "in it; the tokens sampled after it are dropped, as if never sampled), e.g. [\"\\n\"] (null: only <eos> "
        "ends one)")
    dtype: str = _f(
        "float32", "precision the workers sample in; bfloat16 halves the bytes each decode step reads (the learner "
        "stays float32 and corrects every sample by pi/mu as algo.off_policy says, as it does stale ones)",
        ("float32", "bfloat16"),
    )
    cpu_kernels: bool = _f(
        True, "on a CPU, sample with distpg's C kernels for the decode attention and GELU, built on first use "
        "with the machine's C compiler ($CC or cc) into ~/.cache/distpg, and with the weight matrices laid out "
        "once per policy version for the matrix products (oneDNN's layout, or float32 transposed for MKL on Intel: a "
        "second copy of the weights in each worker); "
        "without a compiler or oneDNN (a warning says so), or when false, PyTorch's ops: the same samples up to "
        "float rounding, slower")
    colocate: bool = _f(
        False, "run rollout worker 0 in the learner's actor (sync mode): it samples with the learner's own "
        "weights, with no process, model copy or weights transfer of its own, and with one worker a step is one "
        "call; it uses the learner's CPUs/GPU share and node, the other workers are actors as usual")
    num_cpus_per_worker: float = _f(0.5, "CPUs reserved per worker; torch threads = max(1, round(this))")
    num_gpus_per_worker: float = _f(0.25, "GPU fraction per worker when training on GPUs")
    timeout_s: float = _f(300.0, "longest wait for one worker's batch; a worker that takes longer is replaced")
    max_restarts: int = _f(20, "replacements of dead or hung workers allowed per run before it stops")
    reward_isolation: str = _f(
        "auto", "where rewards run: process (a killable child with a timeout), none (in the worker), "
        "auto (process for a user's code: a 'module:attr' task or task.reward; none for the built-in tasks)",
        ("auto", "process", "none"),
    )
    reward_timeout_s: float = _f(30.0, "longest a batch's rewards may take in a child process; then it is killed")
    node_resource: str | list | None = _f(
        None, "custom Ray resource a worker's node must have (e.g. distpg_node_1); a list pins workers to its "
        "entries round-robin; null: any node")


@dataclass(frozen=True)
class AlgoConfig:
    baseline: str = _f(
        "group", "b in (r - b): none, ema (running mean), group (leave-one-out mean of the prompt's group), "
        "value (a learned value head on the policy trunk: per-token advantages)", ("none", "ema", "group", "value"),
    )
    value_coef: float = _f(0.5, "value baseline: weight of the value head's squared-error loss")
    kl_coef: float = _f(0.0, "weight of the KL penalty to the frozen initial policy (0: off)")
    kl_estimator: str = _f("k3", "per-token KL estimator: k1 (log ratio) or k3 ((rho - 1) - log rho, at most 10 a "
                           "token as veRL's low_var_kl)", ("k1", "k3"))
    entropy_coef: float = _f(0.0, "entropy bonus weight (0: off)")
    whiten: str = _f("none", "divide advantages by the reward std of the batch or group (biased)",
                     ("none", "batch", "group"))
    loss_agg: str = _f("seq_sum", "seq_sum: -1/B sum_i sum_t A log pi (unbiased); token_mean: divide by the "
                       "number of tokens (length-weighted, biased)", ("seq_sum", "token_mean"))
    ema_decay: float = _f(0.9, "ema baseline: b <- decay * b + (1 - decay) * batch mean reward (b starts at the first "
                           "batch's mean; that batch itself uses b = 0)")
    max_staleness: int = _f(1, "async: a batch is at most this many policy versions older than the learner")
    staleness_schedule: str = _f(
        "newest", "async: the policy version step s is sampled with: newest (the newest a worker has been handed, "
        "within max_staleness; depends on timing) or exact (always s - 1 - max_staleness, or the run's first: same "
        "config and seed, same numbers)", ("newest", "exact"),
    )
    off_policy: str = _f(
        "clipped", "correction of samples not drawn from the learner's policy (stale in async runs, top-k/top-p, "
        "bfloat16): clipped (PPO's surrogate around the sampling version's policy pi_old, weighted by pi_old/mu), "
        "truncated (IS ratio pi/mu capped at is_cap), none", ("clipped", "truncated", "none"),
    )
    is_cap: float = _f(1.0, "truncated: cap on the per-token importance ratio pi/mu (V-trace's rho-bar)")
    clip_eps: float = _f(0.2, "clipped: PPO clip range epsilon")
    dual_clip: float = _f(
        3.0, "clipped: PPO's dual clip c (veRL's clip_ratio_c): a token with a negative advantage A adds at least "
        "c * A to the surrogate, so one whose ratio pi/pi_old ran above c adds no gradient; 0: off, else above 1")


@dataclass(frozen=True)
class LearnerConfig:
    lr: float = _f(1e-3, "Adam learning rate (the peak, with a schedule)")
    lr_schedule: str = _f(
        "constant", "the learning rate over the run's updates, after learner.warmup_steps: constant; linear or "
        "cosine decay from learner.lr at the end of the warmup to learner.lr * learner.min_lr_ratio at run.steps "
        "(transformers' schedulers, as TRL uses them: update k takes the rate of their step k - 1)",
        ("constant", "linear", "cosine"),
    )
    warmup_steps: int = _f(0, "updates over which the learning rate rises linearly from 0 to learner.lr")
    min_lr_ratio: float = _f(0.0, "linear and cosine: the learning rate reached at run.steps, a fraction of learner.lr")
    beta1: float = _f(0.9, "Adam beta1, in [0, 1)")
    beta2: float = _f(0.99, "Adam beta2, in [0, 1)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    grad_clip: float = _f(1.0, "clip the gradient norm to this, the policy's and the value head's apart (0: off)")
    micro_batch_size: int = _f(0, "samples per forward/backward pass, to fit memory (0: whole batch)")
    epochs: int = _f(1, "passes over each step's batch (PPO's epochs, TRL's num_iterations, OpenRLHF's max_epochs): "
                     "after the first optimizer step the samples are off-policy, corrected by algo.off_policy "
                     "(clipped: PPO's surrogate)")
    mini_batches: int = _f(1, "optimizer steps per pass: the step's batch split into this many parts of whole "
                           "prompt groups (PPO's mini-batches; split afresh at random in each later pass), the "
                           "baselines computed over the whole batch first")
    max_consecutive_skips: int = _f(
        10, "updates skipped in a row for a non-finite loss or gradient, or for having no sample whose reward was "
        "scored (every one failed: timeouts, a dead reward process, a service down), before the run stops (an "
        "update with learner.epochs x learner.mini_batches optimizer steps counts once, however many of them were "
        "skipped)")
    dtype: str = _f(
        "float32", "precision of the learner's forward and backward passes: bfloat16 runs their matrix products "
        "under torch.autocast in bfloat16, while the parameters, gradients and Adam's state stay float32 (mixed "
        "precision, as TRL's bf16=True and OpenRLHF's --bf16; on a GPU it needs bfloat16 support, Ampere or "
        "newer); the learner's log-probabilities then differ from the sampler's by rounding, so every sample is "
        "corrected as off-policy as algo.off_policy says, with the sampling policy's log-probabilities recomputed "
        "by the learner (as with rollout.dtype=bfloat16)",
        ("float32", "bfloat16"),
    )
    num_cpus: float = _f(1.0, "CPUs reserved for the learner actor")
    num_gpus: float = _f(0.5, "GPUs for the learner when training on GPUs (0.5: with the default 2 workers at "
                          "0.25 each, one GPU holds the whole run)")
    node_resource: str | None = _f(None, "custom Ray resource the learner's node must have (null: any node)")


@dataclass(frozen=True)
class RayConfig:
    address: str | None = _f(None, "cluster to join (null: $RAY_ADDRESS, else start a local Ray)")
    num_cpus: int | None = _f(None, "CPUs of a local Ray runtime (null: this machine's)")
    placement_strategy: str = _f(
        "PACK", "placement group strategy for the actors (one bundle each): PACK and SPREAD are preferences; "
        "STRICT_PACK puts them all on one node, STRICT_SPREAD each on a node of its own (checked against the "
        "cluster's nodes before any actor starts)", ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    dashboard: bool = _f(False, "start the dashboard with a local runtime (bound to 127.0.0.1)")
    timeout_s: float = _f(300.0, "longest wait for any remote call other than sampling (a run.eval_every "
                              "evaluation also gets rollout.timeout_s per worker's share of a step it generates)")


@dataclass(frozen=True)
class LogConfig:
    tensorboard: bool = _f(True, "write TensorBoard event files under RUN_DIR/tb")
    rollouts: bool = _f(True, "write every trajectory to RUN_DIR/rollouts/*.parquet")
    rollout_flush_every: int = _f(50, "steps of rollouts per Parquet file")
    print_every: int = _f(10, "console progress line every this many steps")
    samples: int = _f(4, "sample completions written to TensorBoard as text")
    sample_every: int = _f(50, "steps between sample texts")
    ledger: bool = _f(False, "write RUN_DIR/ledger.parquet: every (prompt_id, sample_idx, version) the learner "
                      "consumed")


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- loading


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is dict:
        return isinstance(value, dict) or value is None
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join("null" if t is type(None) else t.__name__ for t in typing.get_args(tp))
    return tp.__name__


_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce_float(value: Any, tp: Any) -> Any:
    """For float fields: ints become floats, and so do strings like '3e-4' (YAML 1.1 reads them as text)."""
    if tp is not float and float not in typing.get_args(tp):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
        return float(value)
    return value


def _build(cls, data: Any, where: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), fields, n=1)
        raise ConfigError(
            f"unknown key {where + '.' if where else ''}{unknown[0]}"
            f"{f' (did you mean {close[0]}?)' if close else ''}; valid keys"
            f"{' of ' + where if where else ''}: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        tp, path = hints[name], f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, path)
            continue
        value = _coerce_float(value, tp)
        choices = fields[name].metadata.get("choices")
        if not _type_ok(value, tp):
            allowed = f"; allowed are {', '.join(map(str, choices))}" if choices else ""
            # YAML reads off/on/no/yes as booleans and 1e3 (no dot) as a string
            hint = (" (YAML reads yes/no/on/off as true/false: quote the value)" if isinstance(value, bool) else
                    f" (YAML reads {value} as text: write {float(value):g} in full)"
                    if isinstance(value, str) and tp is int and _is_float_text(value) else
                    " (YAML reads 'key: value' as a mapping: quote the value)" if isinstance(value, dict) and
                    str in (tp, *typing.get_args(tp)) else " (YAML reads an empty value as null)" if value is None
                    else "")
            shown, got = ("null", "null") if value is None else (repr(value), type(value).__name__)
            raise ConfigError(f"{path}={shown}: expected {_type_name(tp)}, got {got}{allowed}{hint}")
        if isinstance(value, float) and not math.isfinite(value):  # nan and inf pass the range checks
            raise ConfigError(f"{path}={value!r}: must be a finite number")
        if choices and value not in choices:
            raise ConfigError(f"{path}={value!r}: allowed are {', '.join(map(str, choices))}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _is_float_text(text: str) -> bool:
    try:
        return float(text).is_integer()
    except ValueError:
        return False


def _validate(cfg: Config) -> None:
    """Checks that need more than one field. Raises ConfigError."""
    positive = {
        "run.steps": cfg.run.steps,
        "run.checkpoint_every": cfg.run.checkpoint_every,
        "run.keep_checkpoints": cfg.run.keep_checkpoints,
        "rollout.num_workers": cfg.rollout.num_workers,
        "rollout.prompts_per_step": cfg.rollout.prompts_per_step,
        "rollout.group_size": cfg.rollout.group_size,
        "task.num_eval": cfg.task.num_eval,
        "model.n_layer": cfg.model.n_layer,
        "model.n_head": cfg.model.n_head,
        "model.n_positions": cfg.model.n_positions,
        "log.rollout_flush_every": cfg.log.rollout_flush_every,
        "log.print_every": cfg.log.print_every,
        "log.sample_every": cfg.log.sample_every,
        "learner.epochs": cfg.learner.epochs,
        "learner.mini_batches": cfg.learner.mini_batches,
    }
    for path, value in positive.items():
        if value < 1:
            raise ConfigError(f"{path}={value}: must be at least 1")
    if cfg.run.eval_every is not None and cfg.run.eval_every < 1:
        raise ConfigError(f"run.eval_every={cfg.run.eval_every}: must be at least 1 (or null: no evaluation)")
    if cfg.task.eval_prompts_path is not None and cfg.run.eval_every is None:
        raise ConfigError(f"task.eval_prompts_path={cfg.task.eval_prompts_path!r} is scored every run.eval_every "
                          "steps, which is null: set run.eval_every (or score the file after training with distpg "
                          "eval RUN --prompts FILE)")
    if cfg.rollout.max_new_tokens is not None and cfg.rollout.max_new_tokens < 1:
        raise ConfigError(f"rollout.max_new_tokens={cfg.rollout.max_new_tokens}: must be at least 1 (or null)")
    if cfg.learner.mini_batches > cfg.rollout.prompts_per_step:
        raise ConfigError(f"learner.mini_batches={cfg.learner.mini_batches} is more than the "
                          f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} prompt groups a step's batch "
                          "holds; a mini-batch holds whole groups")
    if (cfg.learner.epochs > 1 or cfg.learner.mini_batches > 1) and cfg.algo.off_policy == "none":
        raise ConfigError(f"learner.epochs={cfg.learner.epochs} and learner.mini_batches={cfg.learner.mini_batches} "
                          "take several optimizer steps on a batch, and after the first its samples are off-policy: "
                          "algo.off_policy=none would ignore that (a biased gradient); use clipped (PPO) or truncated")
    if cfg.algo.baseline == "group" and cfg.rollout.group_size < 2:
        raise ConfigError(
            f"algo.baseline=group needs rollout.group_size >= 2 (got {cfg.rollout.group_size}): the "
            "leave-one-out baseline averages the other samples of the same prompt; use baseline ema or none"
        )
    if cfg.rollout.prompts_per_step < cfg.rollout.num_workers:
        raise ConfigError(
            f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} is less than rollout.num_workers="
            f"{cfg.rollout.num_workers}: every worker needs at least one prompt per step"
        )
    if cfg.rollout.colocate and cfg.run.mode == "async":
        raise ConfigError("rollout.colocate=true needs run.mode=sync: in async mode the learner trains while "
                          "the workers sample, so a worker in its process would hold it up")
    if not cfg.rollout.temperature > 0:
        raise ConfigError(f"rollout.temperature={cfg.rollout.temperature:g}: must be above 0 (1.0 samples from the "
                          "policy itself); 0 would sample greedily: every sample of a prompt the same, so the "
                          "advantages and the policy gradient 0 and nothing learned (distpg eval scores greedily "
                          "on its own)")
    ranges = {
        # numpy's SeedSequence (prompts, sampling seeds, held-out split) refuses a negative seed, and
        # torch.manual_seed (model init) one past 2**64 - 1
        "run.seed": (cfg.run.seed, 0, 2**64 - 1),
        "task.eval_seed": (cfg.task.eval_seed, 0, 2**64 - 1),
        "rollout.top_p": (cfg.rollout.top_p, 1e-9, 1.0),
        "rollout.top_k": (cfg.rollout.top_k, 0, None),
        "rollout.num_cpus_per_worker": (cfg.rollout.num_cpus_per_worker, 0.0, None),
        "rollout.num_gpus_per_worker": (cfg.rollout.num_gpus_per_worker, 0.0, None),
        "rollout.timeout_s": (cfg.rollout.timeout_s, 1e-3, None),
        "rollout.reward_timeout_s": (cfg.rollout.reward_timeout_s, 1e-3, None),
        "algo.ema_decay": (cfg.algo.ema_decay, 0.0, 1.0),
        "algo.max_staleness": (cfg.algo.max_staleness, 0, None),
        "algo.value_coef": (cfg.algo.value_coef, 0.0, None),
        "algo.kl_coef": (cfg.algo.kl_coef, 0.0, None),
        "algo.entropy_coef": (cfg.algo.entropy_coef, 0.0, None),
        "rollout.max_restarts": (cfg.rollout.max_restarts, 0, None),
        "learner.max_consecutive_skips": (cfg.learner.max_consecutive_skips, 0, None),
        "algo.is_cap": (cfg.algo.is_cap, 1e-6, None),
        "algo.clip_eps": (cfg.algo.clip_eps, 0.0, 1.0),
        "learner.lr": (cfg.learner.lr, 0.0, None),
        "learner.warmup_steps": (cfg.learner.warmup_steps, 0, None),
        "learner.min_lr_ratio": (cfg.learner.min_lr_ratio, 0.0, 1.0),
        "learner.grad_clip": (cfg.learner.grad_clip, 0.0, None),
        "learner.weight_decay": (cfg.learner.weight_decay, 0.0, None),
        "learner.beta1": (cfg.learner.beta1, 0.0, 1.0),
        "learner.beta2": (cfg.learner.beta2, 0.0, 1.0),
        "learner.micro_batch_size": (cfg.learner.micro_batch_size, 0, None),
        "learner.num_cpus": (cfg.learner.num_cpus, 0.0, None),
        "learner.num_gpus": (cfg.learner.num_gpus, 0.0, None),
        "ray.timeout_s": (cfg.ray.timeout_s, 1e-3, None),
        "log.samples": (cfg.log.samples, 0, None),
    }
    # optional numbers: null, or a value in range (0 would be as good as null for num_cpus, and a stop at once for
    # max_time_s: said rather than taken)
    optional = {"run.max_time_s": (cfg.run.max_time_s, "above 0 (seconds), or null for no limit"),
                "ray.num_cpus": (cfg.ray.num_cpus, "at least 1, or null for this machine's CPUs")}
    for path, (value, allowed) in optional.items():
        if value is not None and not value > 0:  # nan too
            raise ConfigError(f"{path}={value}: must be {allowed}")
    for path, (value, lo, hi) in ranges.items():
        if value != value or value < lo or (hi is not None and value > hi):
            allowed = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise ConfigError(f"{path}={value}: must be {allowed}")
    if cfg.algo.dual_clip != 0 and not cfg.algo.dual_clip > 1:  # c <= 1 would stop a negative A's gradient at r <= 1
        raise ConfigError(f"algo.dual_clip={cfg.algo.dual_clip}: must be 0 (off) or above 1 (the bound c on the "
                          "ratio of a token with a negative advantage, veRL's clip_ratio_c; the default is 3.0)")
    for name in ("beta1", "beta2"):  # Adam divides by 1 - beta**t
        if getattr(cfg.learner, name) == 1.0:
            raise ConfigError(f"learner.{name}=1.0: must be below 1 (Adam divides by 1 - {name}**step; the defaults "
                              "are 0.9 and 0.99)")
    f32_max = 3.4028234663852886e38  # float32's largest finite number
    first_step = cfg.learner.lr / (1.0 - cfg.learner.beta1)  # Adam's first step size, a float32 scalar
    if first_step > f32_max:
        raise ConfigError(f"learner.lr={cfg.learner.lr:g}: Adam's first step is learner.lr / (1 - learner.beta1) = "
                          f"{first_step:g}, past float32's largest number ({f32_max:.3g}): at most "
                          f"{f32_max * (1.0 - cfg.learner.beta1):.3g} with this beta1")
    if cfg.rollout.num_gpus_per_worker > 1 and cfg.rollout.num_gpus_per_worker != int(
        cfg.rollout.num_gpus_per_worker
    ):
        raise ConfigError(
            f"rollout.num_gpus_per_worker={cfg.rollout.num_gpus_per_worker}: Ray allows a fraction below 1 "
            "or a whole number of GPUs"
        )
    if cfg.learner.num_gpus > 1 and cfg.learner.num_gpus != int(cfg.learner.num_gpus):
        raise ConfigError(f"learner.num_gpus={cfg.learner.num_gpus}: Ray allows a fraction below 1 or a whole number")
    _validate_node_resources(cfg)
    _validate_rewards(cfg.task)
    if isinstance(cfg.rollout.stop, list) and not stop_strings(cfg.rollout):
        raise ConfigError("rollout.stop=[]: give at least one stop string, or null")
    bad = next((s for s in stop_strings(cfg.rollout) if not isinstance(s, str) or not s), None)
    if bad is not None:
        raise ConfigError(f"rollout.stop: {bad!r} is not a stop string (a non-empty string: quote a number, "
                          "\"\\n\" for a newline)")


# settings that only some values of another put to use: (section, field, the section.field that decides, those
# values in words, whether a value of it puts the field to use)
DEPENDENT = (
    ("algo", "max_staleness", "run.mode", "=async", lambda v: v == "async"),
    ("algo", "staleness_schedule", "run.mode", "=async", lambda v: v == "async"),
    ("algo", "ema_decay", "algo.baseline", "=ema", lambda v: v == "ema"),
    ("algo", "value_coef", "algo.baseline", "=value", lambda v: v == "value"),
    ("algo", "kl_estimator", "algo.kl_coef", ">0", lambda v: v > 0),
    ("algo", "is_cap", "algo.off_policy", "=truncated", lambda v: v == "truncated"),
    ("algo", "clip_eps", "algo.off_policy", "=clipped", lambda v: v == "clipped"),
    ("algo", "dual_clip", "algo.off_policy", "=clipped", lambda v: v == "clipped"),
    ("learner", "min_lr_ratio", "learner.lr_schedule", "=linear or cosine", lambda v: v in ("linear", "cosine")),
)


def inert_settings(cfg: Config) -> list[str]:
    """The settings given another value than their default that this config never uses, each said as
    'algo.ema_decay=0.99 has no effect: it applies only with algo.baseline=ema (here algo.baseline=group)', and a
    warmup longer than the run (its peak rate never used). A setting silently ignored looks like one that did
    nothing (helpers' trials: algo.max_staleness in a sync run, learner.warmup_steps=50 in a 12-step run)."""
    said = []
    for section, name, decider, when, used in DEPENDENT:
        value = getattr(getattr(cfg, section), name)
        default = next(f.default for f in dataclasses.fields(getattr(cfg, section)) if f.name == name)
        now = getattr(getattr(cfg, decider.split(".")[0]), decider.split(".")[1])
        if value != default and not used(now):
            said.append(f"{section}.{name}={value} has no effect: it applies only with {decider}{when} (here "
                        f"{decider}={now})")
    lc, steps = cfg.learner, cfg.run.steps
    if lc.warmup_steps >= steps:  # update k takes warmup factor (k - 1) / warmup_steps (algo.lr_factor)
        said.append(f"learner.warmup_steps={lc.warmup_steps} keeps the learning rate below learner.lr={lc.lr:g} for "
                    f"the whole run (run.steps={steps}: at most {(steps - 1) / lc.warmup_steps:.0%} of it)")
    return said


def _listed(value: str | list | None) -> list:
    """A field that takes one string, a list of them, or null, as a list (one, several, or none)."""
    return [value] if isinstance(value, str) else list(value or [])


def node_resources(cfg: Config) -> tuple[list[str], str | None]:
    """(the workers' node resources, round-robin; empty: any node) and the learner's (None: any node)."""
    return _listed(cfg.rollout.node_resource), cfg.learner.node_resource


def _validate_node_resources(cfg: Config) -> None:
    workers, learner = node_resources(cfg)
    if isinstance(cfg.rollout.node_resource, list) and not workers:
        raise ConfigError("rollout.node_resource=[]: name at least one resource, or null for any node")
    for path, name in [("rollout.node_resource", w) for w in workers] + [("learner.node_resource", learner)]:
        if name is None:
            continue
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{path}: {name!r} is not a resource name (a non-empty string, e.g. distpg_node_1)")
        if name in _BUILTIN_RESOURCES or name.startswith("node:"):
            raise ConfigError(f"{path}={name!r} is a built-in Ray resource; name a custom one (ray start "
                              "--resources='{\"distpg_node_1\": 1}')")


_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def stop_strings(rollout: RolloutConfig) -> list[str]:
    """rollout.stop as a list (one, several, or none)."""
    return _listed(rollout.stop)


def reward_specs(task: TaskConfig) -> list[str]:
    """task.reward as a list of 'module:attr' (one, several, or none)."""
    return _listed(task.reward)


def _validate_rewards(task: TaskConfig) -> None:
    specs = reward_specs(task)
    if isinstance(task.reward, list) and not specs:
        raise ConfigError("task.reward=[]: name at least one reward function 'module:attr', or null")
    for spec in specs:
        if not isinstance(spec, str) or not spec.strip():
            raise ConfigError(f"task.reward: {spec!r} is not a reward function's 'module:attr' (a non-empty string)")
    twice = next((s for i, s in enumerate(specs) if s in specs[:i]), None)
    if twice is not None:
        raise ConfigError(f"task.reward lists {twice!r} twice; to count a function more, give it a larger weight "
                          "in task.reward_weights")
    weights = task.reward_weights
    if weights is None:
        return
    if not specs:
        raise ConfigError("task.reward_weights is set but task.reward is null: the weights are task.reward's")
    bad = next((w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float))
                or not math.isfinite(w)), None)
    if bad is not None:
        raise ConfigError(f"task.reward_weights={weights!r}: {bad!r} is not a finite number; give one number per "
                          "task.reward function, in its order")
    if len(weights) != len(specs):
        raise ConfigError(f"task.reward_weights={weights!r}: {len(weights)} weights for {len(specs)} reward "
                          f"function(s) in task.reward; give one number per function, in its order")
    if not any(weights):
        raise ConfigError(f"task.reward_weights={weights!r}: every weight is 0, so every reward would be 0 and "
                          "there would be nothing to learn; give at least one function a non-zero weight")


def parse_set(item: str) -> tuple[list[str], Any]:
    """'a.b=value' -> (['a', 'b'], YAML-typed value)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. --set rollout.num_workers=4")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: the key must be SECTION.FIELD, e.g. task.length")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML: {e}") from None
    if parts == ["rollout", "stop"] and "\\" in raw:
        escape = _plain_escape(yaml.compose(raw))
        if escape is not None:  # the shell passed the backslash on, and YAML keeps it outside double quotes
            name = {"n": "a newline", "t": "a tab", "r": "a carriage return"}[escape[1]]
            raise ConfigError(
                f"--set {item}: {escape} is two characters here, a backslash and {escape[1]!r} (YAML reads "
                f"escapes only inside double quotes): for {name} double-quote it (--set 'rollout.stop=\"{escape}\"'); "
                f"for the two characters, single-quote it ('{escape}')")
    return parts, value


def _plain_escape(node: yaml.Node | None) -> str | None:
    """The first \\n, \\t or \\r in an unquoted YAML scalar of `node` (a scalar or a list of them), or None."""
    nodes = node.value if isinstance(node, yaml.SequenceNode) else [node]
    for n in nodes:
        if isinstance(n, yaml.ScalarNode) and n.style is None and (m := re.search(r"\\[ntr]", n.value)):
            return m.group(0)
    return None


def merge_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply --set items to a nested dict (a copy)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        parts, value = parse_set(item)
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
            else:
                child = node[p] = dict(child)
            node = child
        node[parts[-1]] = value
    return out


def config_from_dict(data: dict | None) -> Config:
    return _build(Config, data or {}, "")


def default_config_path() -> Path:
    return Path(__file__).parent / "configs" / "default.yaml"


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (default: the embedded one), apply --set overrides, validate."""
    _, data = _read_yaml(Path(path) if path is not None else default_config_path())
    return _from_file(data, overrides, path)


def _from_file(data: dict, overrides: list[str] | None, path: str | os.PathLike | None) -> Config:
    """The config of a file's mapping `data` with `overrides`; a ConfigError names the file (`path`; None: the
    embedded default, which the error cannot come from, so it names nothing)."""
    try:
        return config_from_dict(merge_overrides(data, overrides or []))
    except ConfigError as e:
        if path is None:
            raise
        raise ConfigError(f"{e} (in {str(path)!r}{' or --set' if overrides else ''})") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (a field, or a whole section pasted twice),
    where PyYAML would silently keep the last one and drop the first."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: PyYAML's merge keys, left to it
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the constructor below names it
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice (lines {first} and {key_node.start_mark.line + 1}): the "
                    "second would silently replace the first; keep one", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> tuple[str, dict]:
    """A config file's text and its mapping of sections. Raises ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except IsADirectoryError:
        run = " (a run folder: continue it with distpg train --resume FOLDER)" if (path / "config.yaml").is_file() \
            else ""
        raise ConfigError(f"config file {str(path)!r} is a folder{run}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {e.start}): a YAML file?") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        # PyYAML names a text it was handed as "<unicode string>": the message names the file already
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: "
                          f"{str(e).replace('in ' + chr(34) + '<unicode string>' + chr(34) + ', ', 'at ')}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping of sections, got {type(data).__name__}")
    return text, data


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


PROMPTS_FINGERPRINT = "prompts.sha256"  # in a run folder: the sha256 of task.prompts_path when the run started


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def snapshot_prompts(cfg: Config, run_dir: Path) -> None:
    """Record the sha256 of a new run's task.prompts_path: the held-out split and (without model.init_from)
    the character tokenizer come from that file, so a later --resume, eval or export must read the same."""
    if cfg.task.prompts_path and Path(cfg.task.prompts_path).is_file():
        (run_dir / PROMPTS_FINGERPRINT).write_text(f"{file_sha256(cfg.task.prompts_path)}  {cfg.task.prompts_path}\n")


def _check_prompts(data: dict, run_dir: Path) -> None:
    path = (data.get("task") or {}).get("prompts_path")
    record = run_dir / PROMPTS_FINGERPRINT
    if not isinstance(path, str) or not record.is_file() or not Path(path).is_file():
        return  # a run from before fingerprints, or no file: the task names a missing one
    if file_sha256(path) != record.read_text().split()[0]:
        raise ConfigError(
            f"task.prompts_path={path!r} has changed since the run started (its sha256 differs from the one in "
            f"{record}): the held-out prompts and the character tokenizer come from that file, so this run's "
            "policy would be read, scored or continued against other prompts or token ids; put back the file the "
            "run started from (or train a new run on the new file)")


RUN_ORIGIN = "# distpg: relative paths in this file are relative to the folder the run started in: "
RUN_PATHS = (("model", "init_from"), ("task", "prompts_path"), ("task", "eval_prompts_path"))  # files a run reads


def dump_run_config(cfg: Config) -> str:
    """A run folder's config.yaml: the config, after a first line naming the current folder, against which
    its relative paths (`RUN_PATHS`) hold. The config itself keeps them as given: the workers of a job
    submitted with a working dir resolve them in their own copy of it."""
    return f"{RUN_ORIGIN}{os.getcwd()}\n" + dump_config(cfg)


def in_job_copy() -> bool:
    """Does this process run as a `ray job submit` entrypoint in Ray's copy of the job's working dir?"""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ and "working_dir_files" in Path.cwd().parts


def absolute_run_paths(cfg: Config) -> Config:
    """`cfg` with each relative path of `RUN_PATHS` that exists from the current folder made absolute, for the
    actors of a run: Ray starts its workers in the folder its runtime started in (on a cluster, where `ray
    start` ran), not in the driver's. A job's entrypoint (`in_job_copy`) keeps `cfg` as it is: its workers each
    resolve the relative paths in their own copy of the job's working dir."""
    if in_job_copy():
        return cfg
    for section, key in RUN_PATHS:
        part = getattr(cfg, section)
        value = getattr(part, key)
        if isinstance(value, str) and value.strip() and not Path(value).is_absolute() and Path(value).exists():
            part = dataclasses.replace(part, **{key: str(Path(value).absolute())})
            cfg = dataclasses.replace(cfg, **{section: part})
    return cfg


def _origin(text: str) -> Path | None:
    first = text.split("\n", 1)[0]
    origin = Path(first.removeprefix(RUN_ORIGIN)) if first.startswith(RUN_ORIGIN) else None
    return origin if origin is not None and origin.is_dir() else None


def run_origin(run_dir: str | os.PathLike) -> Path | None:
    """The folder a run started in (the first line of its config.yaml, `dump_run_config`), where it still exists;
    None otherwise."""
    try:
        with open(Path(run_dir) / "config.yaml", encoding="utf-8") as f:
            return _origin(f.readline())
    except (OSError, UnicodeDecodeError):
        return None


def load_run_config(path: str | os.PathLike, overrides: list[str] | None = None, weights: bool = True) -> Config:
    """A run folder's config.yaml (`dump_run_config`), for `--resume`, `distpg eval` and `distpg export` from
    any folder: a relative path that does not exist from the current folder, but does from the folder the run
    started in, is taken from there (as an absolute path), and that folder goes last on sys.path, for a
    task or reward module that the run found there (see `cli._modules_from_cwd`).

    `model.init_from` must hold what the run started from (`hf.snapshot_base`): all of it when the caller
    needs its `weights` (--resume: the initial policy and the KL reference), else its config and tokenizer,
    which the run's own copy (RUN_DIR/base) stands in for when the folder is gone (eval, export: the weights
    come from a checkpoint). `task.prompts_path` must be the file the run started from (`snapshot_prompts`).
    Raises ConfigError otherwise."""
    text, data = _read_yaml(Path(path))
    origin = _origin(text)
    if origin is not None:
        if str(origin) not in sys.path:
            sys.path.append(str(origin))
        for section, key in RUN_PATHS:
            value = (data.get(section) or {}).get(key)
            if isinstance(value, str) and not Path(value).is_absolute() and not Path(value).exists() \
                    and (origin / value).exists():
                data[section] = {**data[section], key: str(origin / value)}
    init = (data.get("model") or {}).get("init_from")
    if isinstance(init, str) and init.strip():
        _check_base(data, init, Path(path).parent, weights)
    _check_prompts(data, Path(path).parent)
    return _from_file(data, overrides, path)


def _check_base(data: dict, init: str, run_dir: Path, weights: bool) -> None:
    from distpg.hf import BASE, FINGERPRINT, base_changes

    base = run_dir / BASE
    if not base.is_dir():
        return  # a run from before snapshots: config validation names a missing folder
    if not Path(init).is_dir():
        if weights:
            raise ConfigError(f"model.init_from={init!r}: no such folder any more; resuming needs the weights "
                              "the run started from (its initial policy and KL reference): put the folder back")
        data["model"] = {**data["model"], "init_from": str(base)}
        return
    changed = base_changes(init, run_dir, weights)
    if changed:
        raise ConfigError(
            f"model.init_from={init!r} has changed since the run started: {', '.join(changed)}, against what "
            f"{base / FINGERPRINT} recorded; "
            + ("resuming would go on against another initial policy and KL reference: put back the folder "
               "the run started from" if weights else
               "its tokenizer or config is not the run's: put back the folder the run started from, or move "
               f"this one away (eval and export then read the run's own copy, {base})"))


def describe(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> str:
    """Every field with the value `distpg train` uses (the embedded default config, or the config file `path`,
    with `overrides`) and its doc, as YAML, for --help-config."""
    cfg = load_config(path, overrides)
    if path is None and not overrides:
        lines = ["# what `distpg train` runs without CONFIG or --set: the embedded configs/default.yaml over the "
                 "built-in defaults"]
    else:
        lines = [f"# what `distpg train` runs with {'CONFIG ' + str(path) if path else 'the embedded default'}"
                 f"{' and --set ' + ' '.join(overrides) if overrides else ''}"]
    for section in dataclasses.fields(Config):
        lines.append(f"{section.name}:")
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            lines.append(f"  {f.name}: {json.dumps(getattr(values, f.name)):<12} # {f.metadata.get('doc', '')}")
    return "\n".join(lines)
