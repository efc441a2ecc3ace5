"""A learner that also runs rollout worker 0 in its own process (`rollout.colocate: true`).

Sync mode samples and learns in turns, so the learner's process is idle while the workers sample. With
`rollout.colocate` worker 0 lives in the learner's actor instead of an actor of its own (as in veRL's
hybrid engine or OpenRLHF's colocated models): it samples with the learner's own parameters (views of
the same buffer when it samples in the learner's dtype, else one converting copy per version), so it
needs no process, no model copy and no weights transfer, and with one worker a whole step is one call
(`step`), with no weights published at all. The learner's resources (CPUs, GPU share) serve both.

The numbers are those of the same run with worker 0 as an actor of its own: the same prompts, seeds and
weights (tested).
"""

from __future__ import annotations

import pyarrow as pa

from distpg import kernels
from distpg.config import Config
from distpg.learner import Learner
from distpg.rewards import RewardError, step_failure
from distpg.rollout import RolloutWorker
from distpg.weights import WeightsError, WeightsMessage

LEARNERS_OWN = "the learner's own"  # what `step` hands its worker: any weights handed mean the learner's


class _FollowingWorker(RolloutWorker):
    """Rollout worker 0 inside the learner's process: whatever weights it is handed, it takes the
    learner's current ones (the driver only ever hands the learner's newest version)."""

    def __init__(self, learner: Learner, cfg: Config, num_threads: int, device: str) -> None:
        super().__init__(cfg, 0, num_threads, device)
        self.learner = learner

    def take(self, weights) -> None:
        if self.version != self.learner.version:
            self.follow()

    def set_weights(self, msg: WeightsMessage) -> int:
        if msg.version != self.learner.version:
            raise WeightsError(f"the colocated rollout worker 0 was handed v{msg.version}; its learner holds "
                               f"v{self.learner.version}")
        return self.follow()

    def sample(self, *args, **kwargs) -> pa.RecordBatch:
        """`RolloutWorker.sample`, then the pre-packed weights (see `kernels.packed_weights`) go: the learner
        changes these parameters in place (each update, `load_state`), so no copy is valid past learn(). Their
        memory stays for the next version's copies, as a separate worker's does (`RolloutWorker.set_weights`):
        with the transposed float32 layout (Intel CPUs) the `small` policy (4x256, 50257 tokens) sampled 8x4
        in 38.6 ms against 42.7 (medians of 18, alternating) when the copies went into fresh pages each step.
        The learner's process holds that memory (one transposed copy of the weight matrices) through learn()."""
        try:
            return super().sample(*args, **kwargs)
        finally:
            kernels.release(self.model, keep_memory=True)

    def follow(self) -> int:
        self.flat.follow(self.learner.flat)
        self.version = self.learner.version
        return self.version


class ColocatedLearner(Learner):
    """The learner, plus rollout worker 0's `sample` and `set_weights`, and `step` (sample + learn)."""

    def __init__(self, cfg: Config, num_threads: int = 1, device: str = "cpu") -> None:
        super().__init__(cfg, num_threads, device)
        self.worker = _FollowingWorker(self, cfg, num_threads, device)

    def set_weights(self, msg: WeightsMessage) -> int:
        return self.worker.set_weights(msg)

    def sample(self, prompts: list[str], prompt_ids: list[int], seed: int, weights=None) -> pa.RecordBatch:
        """Worker 0's share (see `RolloutWorker.sample`), always sampled with this learner's current weights
        and labelled with its version (handed `weights` are not fetched: they are this learner's own; with
        none, the worker still follows, since its parameters view the learner's and change with each update)."""
        return self.worker.sample(prompts, prompt_ids, seed, LEARNERS_OWN)

    def step(self, prompts: list[str], prompt_ids: list[int], seed: int) -> tuple[pa.RecordBatch, dict]:
        """A whole synchronous step when worker 0 is the only worker: sample with the current weights, learn
        from the batch. Returns (batch, metrics); nothing is published (no other process needs weights).
        Raises RewardError, learning nothing, where the reward functions failed on every sample (the batch is the
        whole step: see `rewards.step_failure`)."""
        batch = self.sample(prompts, prompt_ids, seed)
        if (why := step_failure(self.cfg.task.name, [batch])) is not None:
            raise RewardError(why)
        return batch, self.learn(batch)
