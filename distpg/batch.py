"""TrajectoryBatch: the Arrow schema of rollouts, its validation, conversion to padded tensors for the
learner, and Parquet writing.

One row per sample (see SCHEMA). Batches cross the Ray object store as `pyarrow.RecordBatch` (zero-copy
buffers); the learner calls `validate` on every batch and rejects a malformed one whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from distpg.ragged import ragged_index

SCHEMA = pa.schema(
    [
        ("prompt_id", pa.int64()),
        ("sample_idx", pa.int32()),
        ("worker_id", pa.int32()),
        ("policy_version", pa.int64()),
        ("prompt_tokens", pa.list_(pa.int32())),
        ("completion_tokens", pa.list_(pa.int32())),
        ("completion_logprobs", pa.list_(pa.float32())),  # log μ(token) under the sampling distribution
        # log π(token) under the sampling policy's softmax(logits / T) before top-k/top-p (= log μ without them)
        ("completion_policy_logprobs", pa.list_(pa.float32())),
        ("reward", pa.float32()),
        ("reward_ok", pa.bool_()),
        ("truncated", pa.bool_()),
        ("prompt_text", pa.string()),
        ("completion_text", pa.string()),
    ]
)


LOGPROBS = ("completion_logprobs", "completion_policy_logprobs")


class BatchError(ValueError):
    """A trajectory batch does not match the schema or its invariants."""


def make_batch(columns: dict[str, list]) -> pa.RecordBatch:
    """Build a RecordBatch with SCHEMA from Python lists (one per field)."""
    missing = [n for n in SCHEMA.names if n not in columns]
    if missing:
        raise BatchError(f"trajectory batch is missing field(s) {', '.join(missing)}")
    return pa.RecordBatch.from_arrays([pa.array(columns[n], type=SCHEMA.field(n).type) for n in SCHEMA.names],
                                      schema=SCHEMA)


def validate(batch: pa.RecordBatch, vocab_size: int) -> None:
    """Raise BatchError naming the first field that breaks the schema or an invariant."""
    if not isinstance(batch, pa.RecordBatch):
        raise BatchError(f"trajectory batch: expected a pyarrow.RecordBatch, got {type(batch).__name__}")
    if batch.num_rows == 0:
        raise BatchError("trajectory batch is empty")
    for f in SCHEMA:
        if f.name not in batch.schema.names:
            raise BatchError(f"trajectory batch: field {f.name!r} is missing")
        got = batch.schema.field(f.name).type
        if got != f.type:
            raise BatchError(f"trajectory batch: field {f.name!r} has type {got}, expected {f.type}")
        if batch.column(f.name).null_count:
            raise BatchError(f"trajectory batch: field {f.name!r} has null values")
    n_tok = pc.list_value_length(batch.column("completion_tokens"))
    for name in LOGPROBS:
        if not pc.all(pc.equal(n_tok, pc.list_value_length(batch.column(name)))).as_py():
            raise BatchError(f"trajectory batch: {name} and completion_tokens differ in length")
    if pc.min(pc.list_value_length(batch.column("prompt_tokens"))).as_py() < 1:
        raise BatchError("trajectory batch: prompt_tokens has an empty prompt")
    for name in ("prompt_tokens", "completion_tokens"):
        flat = batch.column(name).flatten()
        if len(flat):
            lo, hi = pc.min(flat).as_py(), pc.max(flat).as_py()
            if lo < 0 or hi >= vocab_size:
                raise BatchError(f"trajectory batch: {name} has token id {lo if lo < 0 else hi}, "
                                 f"outside the vocabulary [0, {vocab_size})")
    for name in LOGPROBS:
        logprobs = batch.column(name).flatten().to_numpy(zero_copy_only=False)
        if len(logprobs) and not (np.isfinite(logprobs).all() and (logprobs <= 1e-4).all()):
            raise BatchError(f"trajectory batch: {name} has values that are not finite log-probabilities")
    rewards = batch.column("reward").to_numpy(zero_copy_only=False)
    ok = batch.column("reward_ok").to_numpy(zero_copy_only=False)
    if not np.isfinite(rewards[ok]).all():
        raise BatchError("trajectory batch: reward is not finite where reward_ok is true")


@dataclass
class LearnerBatch:
    """A padded view of one or more validated batches, B samples, L = longest prompt + completion.

    tokens:          (B, L) int64, prompt then completion, right-padded with pad_id
    response_mask:   (B, L) bool, True where tokens[:, j] is a completion token
    old_logprobs:    (B, L) float32, log μ aligned with tokens (0 elsewhere)
    policy_logprobs: (B, L) float32, log π of the sampling version before top-k/top-p, aligned likewise
    rewards, ok:     (B,) float32 / bool
    prompt_id:       (B,) int64
    sample_idx:      (B,) int64
    policy_version:  (B,) int64
    """

    tokens: torch.Tensor
    response_mask: torch.Tensor
    old_logprobs: torch.Tensor
    policy_logprobs: torch.Tensor
    rewards: torch.Tensor
    ok: torch.Tensor
    prompt_id: torch.Tensor
    sample_idx: torch.Tensor
    policy_version: torch.Tensor

    def to(self, device) -> LearnerBatch:
        return LearnerBatch(**{k: v.to(device) for k, v in self.__dict__.items()})


def _np(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return col.to_numpy(zero_copy_only=False) if isinstance(col, pa.Array) else col.to_numpy()


def to_learner_batch(batches: list[pa.RecordBatch], pad_id: int) -> LearnerBatch:
    """Concatenate batches and pad them into tensors (no Python loop over samples)."""
    table = pa.Table.from_batches(batches).combine_chunks()
    p_len = _np(pc.list_value_length(table.column("prompt_tokens"))).astype(np.int64)
    c_len = _np(pc.list_value_length(table.column("completion_tokens"))).astype(np.int64)
    B, L = len(p_len), int((p_len + c_len).max())
    tokens = np.full((B, L), pad_id, dtype=np.int64)
    response = np.zeros((B, L), dtype=bool)
    old_lp, policy_lp = np.zeros((B, L), dtype=np.float32), np.zeros((B, L), dtype=np.float32)
    # scatter the flattened lists into rows: row i gets its prompt at [0, p_i), completion at [p_i, p_i + c_i)
    tokens[ragged_index(p_len)] = _np(table.column("prompt_tokens").combine_chunks().flatten())
    rows_c, cols_c = ragged_index(c_len, starts=p_len)
    tokens[rows_c, cols_c] = _np(table.column("completion_tokens").combine_chunks().flatten())
    response[rows_c, cols_c] = True
    old_lp[rows_c, cols_c] = _np(table.column("completion_logprobs").combine_chunks().flatten())
    policy_lp[rows_c, cols_c] = _np(table.column("completion_policy_logprobs").combine_chunks().flatten())
    return LearnerBatch(
        tokens=torch.from_numpy(tokens),
        response_mask=torch.from_numpy(response),
        old_logprobs=torch.from_numpy(old_lp),
        policy_logprobs=torch.from_numpy(policy_lp),
        rewards=torch.from_numpy(_np(table.column("reward")).astype(np.float32)),
        ok=torch.from_numpy(_np(table.column("reward_ok")).astype(bool)),
        prompt_id=torch.from_numpy(_np(table.column("prompt_id")).astype(np.int64)),
        sample_idx=torch.from_numpy(_np(table.column("sample_idx")).astype(np.int64)),
        policy_version=torch.from_numpy(_np(table.column("policy_version")).astype(np.int64)),
    )


def write_table(table: pa.Table, path: Path, **options) -> None:
    """`pq.write_table(table, path, **options)` whole to a temporary name in the same folder, then renamed:
    a reader (or a run resumed after a kill) sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, **options)
    tmp.replace(path)


UNFLUSHED = ".unflushed.parquet"  # in the rollouts folder: the buffered steps at the latest checkpoint


class RolloutWriter:
    """Buffers trajectory batches and writes them to RUN_DIR/rollouts/steps_FIRST-LAST.parquet every
    `flush_every` steps, each file written whole to a temporary name and renamed (always readable)."""

    def __init__(self, directory: Path, flush_every: int) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.flush_every = flush_every
        self._pending: list[pa.RecordBatch] = []
        self._first_step: int | None = None
        self._last_step: int | None = None

    def add(self, step: int, batches: list[pa.RecordBatch]) -> None:
        step_col = None
        for b in batches:
            step_col = pa.array(np.full(b.num_rows, step, dtype=np.int64))
            # without the worker's timings (schema metadata; metrics.jsonl has them as perf/*): the same
            # samples make the same bytes
            self._pending.append(b.replace_schema_metadata(None).append_column("step", step_col))
        if self._first_step is None:
            self._first_step = step
        self._last_step = step
        if self._last_step - self._first_step + 1 >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        # named by the steps the buffer holds, not by the counters `add` sets after buffering: a SIGTERM
        # (raised as KeyboardInterrupt) between the two left them behind it, and the run's last flush failed
        table = pa.Table.from_batches(self._pending)
        if table.num_rows:
            steps = table.column("step")
            name = f"steps_{pc.min(steps).as_py():06d}-{pc.max(steps).as_py():06d}.parquet"
            write_table(table, self.directory / name, compression="zstd")
        (self.directory / UNFLUSHED).unlink(missing_ok=True)  # its rows are in that file now
        self._pending, self._first_step, self._last_step = [], None, None

    def save_unflushed(self) -> None:
        """Write the buffered steps to UNFLUSHED (a name readers of the folder skip) as a checkpoint is taken:
        a kill before the next flush would lose them, and a resume does not redo the steps up to its
        checkpoint. The next flush removes it; a resume names it as that flush would have, if it never came."""
        if self._pending:
            write_table(pa.Table.from_batches(self._pending), self.directory / UNFLUSHED, compression="zstd")
