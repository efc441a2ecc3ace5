"""Scoring a policy on the task's held-out prompts (used by `distpg eval`); plain torch, no Ray."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from distpg import checkpoint, kernels, rewards
from distpg.config import Config, ConfigError, load_run_config, stop_strings
from distpg.generate import generate, stop_checker
from distpg.model import GPT
from distpg.policy import initial_policy, task_for
from distpg.rollout import cut_at_stops, reward_isolation, sampling_params


@dataclass
class EvalResult:
    reward_mean: float  # over the rewards that did not fail
    exact_match: float | None  # over the prompts with a target (None: none has one, as a prompts file without
    # references)
    num_prompts: int
    samples: list[tuple[str, str, str | None, float | None]]  # prompt, completion, target (None: none), reward
    # (None: it failed)
    failed: int = 0  # rewards that failed (raised, not a number, ...): left out of reward_mean
    with_target: int = 0  # prompts with a target, over which exact_match is counted
    left_out: int = 0  # prompts of a --prompts file too long for the model with the run's completion budget
    reward_parts: dict[str, float | None] = field(default_factory=dict)  # several reward functions: each one's
    # mean over the prompts it scored (None: it scored none)
    first_failure: str | None = None  # the first failed reward: 'for prompt P and completion C: ERROR'


def eval_metrics(res: EvalResult) -> dict:
    """An evaluation's figures as metrics (`run.eval_every`'s eval.jsonl and TensorBoard): eval/reward_mean,
    eval/exact_match (null without references), eval/failed_rewards and eval/rewards/NAME of each of several
    reward functions."""
    return {"eval/reward_mean": res.reward_mean, "eval/exact_match": res.exact_match,
            "eval/failed_rewards": res.failed, "eval/num_prompts": res.num_prompts, "eval/left_out": res.left_out,
            **{f"eval/rewards/{name}": v for name, v in res.reward_parts.items()}}


def exact_match(completion: str, target: str) -> bool:
    """The completion is the target, up to whitespace at either end (a GPT-2-style tokenizer's completion
    usually starts with a space; a reference in a prompts file usually does not)."""
    return completion.strip() == target.strip()


def resolve_checkpoint(path: Path) -> tuple[Path, Path]:
    """RUN_DIR or RUN_DIR/checkpoints/step_N -> (run folder, checkpoint folder)."""
    path = Path(path)
    if not path.exists():  # a typo, or a checkpoint that run.keep_checkpoints has since deleted
        held = sorted(p.name for p in path.parent.glob("step_*")) if path.parent.name == "checkpoints" else []
        raise checkpoint.CheckpointError(f"{str(path)!r}: no such folder" + (
            f"; the run's checkpoints are {', '.join(held)} (run.keep_checkpoints keeps the newest)" if held else
            "; give a run folder or one of its RUN_DIR/checkpoints/step_N"))
    if (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists():
        run_dir = path.parent.parent
        if (run_dir / "config.yaml").exists() and path.parent.name == "checkpoints":
            return run_dir, path
        if (path / "config.json").exists():
            raise checkpoint.CheckpointError(
                f"{str(path)!r} is a Hugging Face GPT-2 folder, not a distpg run: train from it with "
                f"--set model.init_from={path}, or open it with transformers")
        raise checkpoint.CheckpointError(
            f"{str(path)!r} is a checkpoint folder outside its run folder: a checkpoint is read with its run's "
            "config.yaml, as RUN_DIR/checkpoints/step_N; pass the run folder or a checkpoint inside it")
    ckpt = checkpoint.latest(path)
    if ckpt is None:
        raise checkpoint.CheckpointError(f"{str(path)!r} is neither a checkpoint folder nor a run folder with a "
                                         "complete checkpoint (RUN_DIR/checkpoints/latest)")
    return path, ckpt


def load_policy(path: Path) -> tuple[Config, GPT]:
    run_dir, ckpt = resolve_checkpoint(path)
    cfg = load_run_config(run_dir / "config.yaml", weights=False)  # the checkpoint's weights go in
    _, model = initial_policy(cfg)
    checkpoint.check(ckpt, {k: tuple(v.shape) for k, v in model.state_dict().items()})  # names what does not fit
    model.load_state_dict(checkpoint.load_model_weights(ckpt))
    return cfg, model.eval()


def load_initial_policy(run_dir: Path) -> tuple[Config, GPT]:
    """The policy a run folder's config starts from (its model.init_from, or the run.seed initialisation),
    as the learner and the workers build it at step 0."""
    cfg = load_run_config(Path(run_dir) / "config.yaml")  # with model.init_from's weights
    _, model = initial_policy(cfg)
    return cfg, model.eval()


def evaluate(cfg: Config, model: GPT, temperature: float = 0.0, seed: int = 0, batch_size: int = 256,
             prompts_path: str | None = None, task=None, test=None) -> EvalResult:
    """Mean reward and exact-match rate (see `exact_match`) on the held-out prompts (greedy by default), or on
    every prompt of `prompts_path` (a test set of a `prompts` run: see `test_set`). `task` and `test`: the
    config's task and that test set, if built already."""
    task = task or task_for(cfg)
    tok = task.tokenizer
    params = replace(sampling_params(cfg, task), temperature=temperature)  # the run's completion budget
    if test is None and prompts_path is not None:
        test = test_set(cfg, prompts_path, tok, params.max_new_tokens)
    dropped = 0 if test is None else test.dropped
    task = test or task
    prompts = task.eval_prompts()
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    completions: list[str] = []
    ids: list[list[int]] = []
    same_weights = object()  # the weights do not change during this loop: laid out for oneDNN once
    stops = stop_strings(cfg.rollout)
    stop_when = stop_checker(tok, stops) if stops else None
    try:
        for s in range(0, len(prompts), batch_size):
            chunk = prompts[s : s + batch_size]
            out = generate(model, [tok.encode(p) for p in chunk], params, gen, pad_id=tok.pad_id,
                           weights_key=same_weights, stop_when=stop_when)
            rows = out.rows()
            cut_at_stops(rows, tok, stops)  # as in training
            completions += [tok.decode(r) for r in rows]
            ids += rows
    finally:
        kernels.release(model)
    # as in training: a user's reward function runs in a killable child with rollout.reward_timeout_s
    scores, ok, errors, parts = rewards.score(task, prompts, completions, reward_isolation(cfg),
                                              cfg.rollout.reward_timeout_s, ids)
    if not any(ok):  # the child hung or died, or every function returned None (score raises for the others)
        raise rewards.RewardError(f"the reward function of task {task.name!r} gave no reward for the "
                                  f"{len(prompts)} held-out prompts: {errors[0]}")
    targets = [task.target(p) for p in prompts]
    matched = [exact_match(c, t) for c, t in zip(completions, targets) if t is not None]
    valid = [r for r, k in zip(scores, ok) if k]
    return EvalResult(
        reward_mean=sum(valid) / max(1, len(valid)),
        exact_match=sum(matched) / len(matched) if matched else None,
        num_prompts=len(prompts),
        samples=list(zip(prompts, completions, targets, [r if k else None for r, k in zip(scores, ok)])),
        failed=len(scores) - len(valid),
        with_target=len(matched),
        reward_parts={name: _mean([v for v in values if v is not None]) for name, values in parts.items()},
        left_out=dropped,
        first_failure=None if (first := rewards.first_failure(prompts, completions, ok, errors)) is None
        else ": ".join(first),
    )


def test_set(cfg: Config, path: str, tokenizer, max_new_tokens: int, field: str = "distpg eval --prompts"):
    """The prompts of another file than the run's (`distpg eval --prompts FILE`: a test set), every one an
    evaluation prompt, encoded with the run's tokenizer and scored with its reward functions (a batched one
    gets this file's columns). Prompts that the model cannot hold with the run's completion budget (or longer
    than its task.max_prompt_tokens) are left out, and counted.

    Raises:
        ConfigError naming `field` (--prompts, or task.eval_prompts_path) and what is wrong (a run of another
        task, a file it cannot read, a character the run's tokenizer cannot write).
    """
    from distpg.tasks import PromptsTask

    if cfg.task.name != "prompts":
        raise ConfigError(f"{field} {path}: scores a file's prompts with a run's task.reward, for a run of "
                          f"task.name=prompts; this run's task is {cfg.task.name!r}, scored on its held-out prompts")
    room = cfg.model.n_positions - max_new_tokens
    limit = min(room, cfg.task.max_prompt_tokens or room)
    try:
        return PromptsTask(replace(cfg.task, prompts_path=str(path), max_prompt_tokens=limit), tokenizer,
                           eval_only=True)
    except ValueError as e:
        why = str(e)
        own = f"task.prompts_path={str(path)!r}: "  # the file's reader names the field it reads for training;
        if why.startswith(own):  # this file is `field`'s, and the run's task.prompts_path is another one
            why = why[len(own):]
        if limit == room and why.startswith(f"task.max_prompt_tokens={limit}: every prompt"):  # the run's room, not
            # a task.max_prompt_tokens the user set: say where the limit comes from
            why = (f"the model holds prompts of at most {room} tokens with the run's completion budget "
                   f"(model.n_positions={cfg.model.n_positions} - {max_new_tokens} completion tokens)"
                   + why[len(f"task.max_prompt_tokens={limit}"):])
        raise ConfigError(f"{field} {path}: {why}") from None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
