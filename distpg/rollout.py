"""RolloutWorker: a plain class that holds a copy of the policy, samples completions for prompts, scores
them with the task's reward function and returns a TrajectoryBatch (Arrow).

The orchestrator makes it a Ray actor; tests construct it directly.
"""

from __future__ import annotations

import time

import pyarrow as pa
import torch

from distpg import kernels, rewards
from distpg.batch import make_batch
from distpg.config import Config, stop_strings
from distpg.generate import SamplingParams, generate, holds_stop, stop_checker
from distpg.memory import retain_freed_memory
from distpg.policy import initial_policy
from distpg.tokenizer import stop_ids
from distpg.weights import FlatParams, WeightsError, WeightsMessage, receive


def sampling_params(cfg: Config, task) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=cfg.rollout.max_new_tokens or task.max_new_tokens,
        temperature=cfg.rollout.temperature,
        top_k=cfg.rollout.top_k,
        top_p=cfg.rollout.top_p,
        stop_token=stop_ids(task.tokenizer),  # the sampler compares with one id where there is one
    )


def stop_lengths(rows: list[list[int]], tokenizer, stops: list[str]) -> list[int | None]:
    """For each completion, its length up to and including the token that completes the first of `stops` in
    its text, None where its text holds none. A binary search over its prefixes: once a prefix's text holds a
    stop string, every longer prefix's does."""
    out = []
    for row in rows:
        if not stops or not holds_stop(tokenizer, stops, row):
            out.append(None)
            continue
        lo, hi = 1, len(row)  # the shortest stopped prefix is in [lo, hi]; the whole row is stopped
        while lo < hi:
            mid = (lo + hi) // 2
            if holds_stop(tokenizer, stops, row[:mid]):
                hi = mid
            else:
                lo = mid + 1
        out.append(lo)
    return out


def cut_at_stops(rows: list[list[int]], tokenizer, stops: list[str], per_token: tuple[list[list], ...] = (),
                 truncated: list[bool] | None = None) -> None:
    """Cut each completion (and its `per_token` lists) after the token that completes a stop string (see
    `stop_lengths`), in place: the tokens sampled after it are dropped as if never sampled, and a cut
    completion is not `truncated`."""
    for i, n in enumerate(stop_lengths(rows, tokenizer, stops)):
        if n is not None:
            rows[i] = rows[i][:n]
            for values in per_token:
                values[i] = values[i][:n]
            if truncated is not None:
                truncated[i] = False


def reward_isolation(cfg: Config) -> str:
    """`rollout.reward_isolation`, with auto resolved: a child process for a user's code (a task named
    "module:attr", or the `prompts` task's `task.reward` function), in the worker for the built-in tasks."""
    if cfg.rollout.reward_isolation != "auto":
        return cfg.rollout.reward_isolation
    return "process" if ":" in cfg.task.name or cfg.task.reward is not None else "none"


class RolloutWorker:
    """Generates and scores rollouts with the policy version it was last given."""

    def __init__(self, cfg: Config, worker_id: int, num_threads: int = 1, device: str = "cpu") -> None:
        retain_freed_memory()  # see distpg.memory: no page faults for each step's tensors
        torch.set_num_threads(max(1, num_threads))
        self.cfg = cfg
        self.worker_id = worker_id
        self.device = device
        self.task, self.model = initial_policy(cfg, device)
        # a lower sampling precision holds its own copy: each load converts the published float32 weights
        self.model.to(getattr(torch, cfg.rollout.dtype)).eval()
        kernels.enabled = cfg.rollout.cpu_kernels
        if device == "cpu" and kernels.enabled:
            kernels.load()  # built (or found in the cache) now rather than in the first sample call
        self.tokenizer = self.task.tokenizer
        self.flat = FlatParams(self.model)
        self.params = sampling_params(cfg, self.task)
        self.reward_isolation = reward_isolation(cfg)
        self.reward_parts = rewards.reward_parts(self.task)
        self.stops = stop_strings(cfg.rollout)
        self.stop_when = stop_checker(self.tokenizer, self.stops) if self.stops else None  # rows end early
        self.version: int | None = None  # no weights received yet

    def set_weights(self, msg: WeightsMessage) -> int:
        """Load a published policy version; returns the version now held.

        On the CPU in float32 the parameters become views of the message's buffer (no copy; see
        distpg.weights), else it is copied (and converted to rollout.dtype); the checksum is re-read only if
        the message was packed on another node.
        """
        kernels.release(self.model, keep_memory=True)  # the previous version's pre-packed weights go (their memory
        # takes the next version's)
        self.flat.load_published(msg)
        self.version = msg.version
        return self.version

    def get_version(self) -> int | None:
        return self.version

    def take(self, weights: WeightsMessage | list) -> None:
        """Load the weights handed along with a sample call, unless they are the version held already."""
        msg = receive(weights, self.cfg.ray.timeout_s)
        if self.version is not None and msg.version < self.version:
            raise WeightsError(f"rollout worker {self.worker_id} holds policy v{self.version} and was handed "
                               f"the older v{msg.version}")
        if msg.version != self.version:
            self.set_weights(msg)

    def sample(self, prompts: list[str], prompt_ids: list[int], seed: int,
               weights: WeightsMessage | list | None = None) -> pa.RecordBatch:
        """G = rollout.group_size completions for each prompt, scored.

        Args:
            prompts: P prompt texts.
            prompt_ids: P globally unique ids (the learner groups samples by them).
            seed: decides every sampled token of this call.
            weights: the policy version to sample with, handed along with the call (saves a separate
                set_weights round trip): a WeightsMessage or `[ref]` to one in the object store (see
                `distpg.weights.receive`); loaded unless it is the version held already. None: the version
                held.
        Returns:
            a RecordBatch of P·G rows (prompt-major) whose policy_version is the version sampled with, with
            `sync_s` (receiving and loading `weights`), `gen_s`, `reward_s` and `not_scored` (how many of its
            samples no reward function scored, each returning None; masked as failed) in its schema metadata,
            and `failed_for`, `failed_with` where a reward failed (`rewards.first_failure`), `function_failed`
            where the functions failed on some samples (raised, returned no number). A share whose every reward
            failed is returned too: whether that stops the run is decided per step (`rewards.step_failure`).
        """
        t_sync = time.perf_counter()
        if weights is not None:
            self.take(weights)
        if self.version is None:
            raise RuntimeError(f"rollout worker {self.worker_id}: sample() called before set_weights()")
        G = self.cfg.rollout.group_size
        t0 = time.perf_counter()
        prompt_tokens = [self.tokenizer.encode(p) for p in prompts]
        generator = torch.Generator(device=self.device).manual_seed(seed)
        out = generate(self.model, [t for t in prompt_tokens for _ in range(G)], self.params, generator,
                       pad_id=self.tokenizer.pad_id, weights_key=self.version, stop_when=self.stop_when)
        completion_tokens = out.rows()
        mask = out.mask.cpu()

        def generated(t: torch.Tensor) -> list[list[float]]:  # each row's values at its generated tokens
            return [row[mask_row].tolist() for row, mask_row in zip(t.cpu(), mask)]

        logprobs = generated(out.logprobs)
        policy_logprobs = logprobs if out.policy_logprobs is out.logprobs else generated(out.policy_logprobs)
        truncated = out.truncated.cpu().tolist()
        if self.stops:
            per_token = (logprobs,) if policy_logprobs is logprobs else (logprobs, policy_logprobs)
            cut_at_stops(completion_tokens, self.tokenizer, self.stops, per_token, truncated)
        texts = [self.tokenizer.decode(t) for t in completion_tokens]
        t1 = time.perf_counter()
        rep_prompts = [p for p in prompts for _ in range(G)]
        reward, ok, errors, parts = rewards.score(self.task, rep_prompts, texts, self.reward_isolation,
                                                  self.cfg.rollout.reward_timeout_s, completion_tokens, check=False)
        t2 = time.perf_counter()
        batch = make_batch(
            {
                "prompt_id": [i for i in prompt_ids for _ in range(G)],
                "sample_idx": list(range(G)) * len(prompts),
                "worker_id": [self.worker_id] * len(rep_prompts),
                "policy_version": [self.version] * len(rep_prompts),
                "prompt_tokens": [t for t in prompt_tokens for _ in range(G)],
                "completion_tokens": completion_tokens,
                "completion_logprobs": logprobs,
                "completion_policy_logprobs": policy_logprobs,
                "reward": reward,
                "reward_ok": ok,
                "truncated": truncated,
                "prompt_text": rep_prompts,
                "completion_text": texts,
            }
        )
        for name in self.reward_parts:  # several reward functions: each one's values (null: none, or it failed)
            batch = batch.append_column(pa.field(f"reward/{name}", pa.float32()),
                                        pa.array(parts.get(name, [None] * len(rep_prompts)), pa.float32()))
        meta = {b"sync_s": str(t0 - t_sync).encode(), b"gen_s": str(t1 - t0).encode(),
                b"reward_s": str(t2 - t1).encode(), b"not_scored": str(rewards.not_scored(errors)).encode()}
        if (failure := rewards.first_failure(rep_prompts, texts, ok, errors)) is not None:
            meta[rewards.FAILED_FOR], meta[rewards.FAILED_WITH] = (s.encode() for s in failure)  # `rewards.failure_in`
        if broken := rewards.function_failures(errors):  # `rewards.step_failure`
            meta[rewards.FUNCTION_FAILED] = str(broken).encode()
        return batch.replace_schema_metadata(meta)
