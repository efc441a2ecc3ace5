"""Checkpoints: atomic save, load, retention.

Layout of one checkpoint (RUN_DIR/checkpoints/step_NNNNNN/):
  model.safetensors   the policy's parameters (opens with safetensors, no pickle)
  value_head.safetensors  the value head, with algo.baseline=value
  optimizer.pt        optimizer state, tensors only (loaded with torch.load(weights_only=True))
  state.json          step, policy version, baseline state, seed; the driver's run.stop_reward window

A checkpoint is written into a temporary folder that is renamed into place when complete; then the
`latest` file is replaced atomically to name it. A crash at any moment leaves `latest` naming a
complete checkpoint. Retention deletes the oldest complete checkpoints beyond `keep`, never `latest`.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STEP_PREFIX = "step_"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or damaged."""


REQUIRED = ("model.safetensors", "optimizer.pt", "state.json")  # a checkpoint's files (value_head: optional)


def same_mode_as(path: Path, like: Path) -> None:
    """Give `path` the permissions of `like`, a file this process just created. safetensors writes its files
    0600 whatever the umask; a checkpoint's other files get the umask's (0644 by default), so that a team can
    read a run folder on shared storage."""
    os.chmod(path, like.stat().st_mode & 0o777)


def save(run_dir: Path, step: int, learner_state: dict, keep: int, run_state: dict | None = None) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, apply retention. Returns its folder.
    `run_state` (JSON-able: the driver's own state, e.g. the stop_reward window) goes into state.json."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{STEP_PREFIX}{step:06d}"
    for stale in root.glob(".tmp-*"):  # left by a process killed mid-write; never named by `latest`
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in learner_state["model"].items()}, str(tmp / "model.safetensors"))
    if learner_state.get("value_head"):
        head = {k: v.contiguous() for k, v in learner_state["value_head"].items()}
        save_file(head, str(tmp / "value_head.safetensors"))
    torch.save(learner_state["optimizer"], tmp / "optimizer.pt")
    state = {
        "step": step,
        "version": learner_state["version"],
        "ema": learner_state["ema"],
        "skipped_steps": learner_state.get("skipped_steps", 0),
        "consecutive_skips": learner_state.get("consecutive_skips", 0),
        **(run_state or {}),
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for f in tmp.glob("*.safetensors"):
        same_mode_as(f, tmp / "state.json")
    _fsync_dir(tmp)
    if final.exists():  # a checkpoint of the same step from an earlier attempt: replace it whole
        shutil.rmtree(final)
    tmp.rename(final)
    write_atomic(root / "latest", final.name + "\n")
    _retain(root, keep, protect=final.name)
    return final


def complete(path: Path) -> bool:
    return all((Path(path) / name).is_file() for name in REQUIRED)


def _require(path: Path) -> None:
    """CheckpointError naming the first of the `REQUIRED` files that checkpoint `path` lacks."""
    for name in REQUIRED:
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: {name} is missing")


def named_latest(run_dir: Path) -> str | None:
    """The checkpoint folder name that RUN_DIR/checkpoints/latest holds, or None without that file."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None: the one `latest` names, or where that is missing or
    incomplete (deleted by hand: a resume started the run over from step 0, its logs cut, while older complete
    checkpoints sat beside it), the complete step_N folder of the highest step."""
    root = Path(run_dir) / "checkpoints"
    if (named := named_latest(run_dir)) and complete(root / named):
        return root / named
    found = sorted(p for p in root.glob(f"{STEP_PREFIX}*") if complete(p)) if root.is_dir() else []
    return found[-1] if found else None


def check(path: Path, shapes: dict[str, tuple[int, ...]] | None = None) -> None:
    """Raise CheckpointError, naming the file, where checkpoint `path` cannot be read whole: a file missing,
    state.json not its JSON, a safetensors header or the optimizer's archive cut or corrupt; or where its policy's
    tensors differ from `shapes` (names and shapes, `model.tensor_shapes` of the run's config: a config.yaml whose
    model was edited). Reads the headers and the archive's index, not the tensors, so it is cheap before Ray starts
    (a damaged file surfaced as a traceback, from the learner's actor, after the runtime had started)."""
    from safetensors import safe_open

    path = Path(path)
    _require(path)

    def damaged(name: str, e: Exception) -> CheckpointError:
        return CheckpointError(f"checkpoint {str(path)!r} is damaged: {name} cannot be read ({type(e).__name__}: "
                               f"{e}); delete the folder to resume from the run's previous complete checkpoint")

    def header(name: str) -> dict[str, tuple[int, ...]]:
        """The name and shape of each tensor of the safetensors file `name`, from its header."""
        try:
            with safe_open(str(path / name), "pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        except Exception as e:  # safetensors' own error types (SafetensorError), OSError
            raise damaged(name, e) from None

    try:
        state = run_state(path)
        int(state["step"]), int(state["version"])
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise damaged("state.json", e) from None
    held = header("model.safetensors")
    if (path / "value_head.safetensors").exists():
        header("value_head.safetensors")
    try:
        with zipfile.ZipFile(path / "optimizer.pt") as z:  # torch.save's format: a zip archive, its index at the end
            z.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise damaged("optimizer.pt", e) from None
    if shapes is not None and held != shapes:
        diff = sorted(k for k in held.keys() | shapes.keys() if held.get(k) != shapes.get(k))
        said = ", ".join(f"{k} {held.get(k, 'absent')} there, {shapes.get(k, 'absent')} by the config"
                         for k in diff[:3]) + (f" (and {len(diff) - 3} more)" if len(diff) > 3 else "")
        raise CheckpointError(f"checkpoint {str(path)!r} holds a policy of another shape than the run's config "
                              f"describes: {said}; the model fields of config.yaml (model.*) must stay as the run "
                              "started")


def run_state(path: Path) -> dict:
    """The run state (state.json) of a checkpoint folder, without loading its tensors."""
    return json.loads((Path(path) / "state.json").read_text())


def load(path: Path) -> tuple[dict, dict]:
    """(learner state for Learner.load_state, run state) from a checkpoint folder. Never unpickles objects."""
    path = Path(path)
    _require(path)
    state = run_state(path)
    learner_state = {
        "model": load_file(str(path / "model.safetensors")),
        "value_head": load_file(str(path / "value_head.safetensors")) if (path / "value_head.safetensors").exists()
        else None,
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True),
        "version": state["version"],
        "ema": state["ema"],
        "skipped_steps": state.get("skipped_steps", 0),
        "consecutive_skips": state.get("consecutive_skips", 0),
    }
    return learner_state, state


def load_model_weights(path: Path) -> dict:
    return load_file(str(Path(path) / "model.safetensors"))


def write_atomic(path: Path, text: str) -> None:
    """`path` holds `text` whole, or stays as it was if the process dies meanwhile: written to a temporary
    name beside it, flushed to disk, then renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # whole on disk before it takes the name
        os.replace(tmp, path)
    except BaseException:  # a full disk, `path` a folder: nothing of the try left beside it
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    for p in path.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def _retain(root: Path, keep: int, protect: str) -> None:
    done = sorted(p for p in root.iterdir() if p.name.startswith(STEP_PREFIX) and complete(p))
    for p in done[: max(0, len(done) - keep)]:
        if p.name != protect:
            shutil.rmtree(p, ignore_errors=True)


def resume_hint(run_dir: Path, steps: int, last_step: int | None = None) -> str:
    """What an interrupted run of `steps` steps keeps: its latest complete checkpoint and the command that
    continues it (or that no run folder was kept: a new run that failed before its first step removes it).
    `last_step`: the step the run had done when it stopped (None: the last one metrics.jsonl logged; a resume
    cuts it to the checkpoint, so a resume that stops before its first step lost nothing)."""
    if not run_dir.exists():
        return "no run folder was kept"
    ckpt = latest(run_dir)
    if ckpt is None:
        return (f"no checkpoint was written yet (run.checkpoint_every): {resume_command(run_dir)} starts it over "
                "from step 0")
    step = run_state(ckpt)["step"]
    if last_step is None:
        last_step = last_logged_step(run_dir / "metrics.jsonl")
    if step >= steps:
        return f"the run had reached its last step ({step}, checkpointed): nothing is lost"
    if step == last_step:
        return (f"the latest checkpoint is step {step}, the last step done: nothing is lost; continue with: "
                f"{resume_command(run_dir)}")
    return f"the steps after the latest checkpoint (step {step}) are lost; continue with: {resume_command(run_dir)}"


def resume_command(run_dir: Path) -> str:
    """The command that continues the run in `run_dir`: `distpg train --resume`, or in a Ray job (whose log is
    read where the job was submitted) the submission that runs it as a job again, `cluster/submit.sh --resume`."""
    from distpg.config import in_job_copy

    return f"{'cluster/submit.sh' if in_job_copy() else 'distpg train'} --resume {run_dir}"


def last_logged_step(path: Path, tail: int = 1 << 16) -> int | None:
    """The step of the last whole record of a metrics.jsonl (read from its end), or None."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail))
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):  # a line cut off by a kill, or the tail's first, partial one
            continue
    return None
