"""Shared fixtures: small configs and one real local Ray runtime per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from distpg.config import config_from_dict, merge_overrides


def randomize_parameters(model, seed: int, scale: float) -> None:
    """Redraw every parameter so next-token distributions are neither uniform nor one-hot:
    matrices N(0, scale), biases N(0, 0.1), LayerNorm weights 1 + N(0, 0.1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "ln_" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(scale * noise)


@pytest.fixture
def pack_every_weight(monkeypatch):
    """Pre-pack every weight matrix for oneDNN inside `kernels.packed_weights`, also the small float32 ones that
    the sampler leaves to F.linear (`kernels.PACK_MIN_FLOAT32`), so that small test models exercise the
    packed products (in this process only)."""
    from distpg import kernels

    monkeypatch.setattr(kernels, "PACK_MIN_FLOAT32", 0)


@pytest.fixture
def decoded_rows(monkeypatch) -> list[int]:
    """The number of rows each sampler decode step of this test decodes, in order (stopped rows dropped)."""
    import distpg.generate as G

    rows, stepper = [], G.decode_stepper

    def counting(model, batch):
        step = stepper(model, batch)
        return lambda tok, *args: rows.append(tok.shape[0]) or step(tok, *args)

    monkeypatch.setattr(G, "decode_stepper", counting)
    return rows


def small_config(*overrides: str):
    """A config that trains in a few seconds: tiny model, 2 workers, few prompts."""
    base = [
        "run.steps=3",
        "run.checkpoint_every=2",
        "task.length=4",
        "task.alphabet=abcd",
        "task.num_eval=16",
        "rollout.prompts_per_step=4",
        "rollout.group_size=4",
        "log.print_every=1",
        "log.rollout_flush_every=2",
    ]
    return config_from_dict(merge_overrides({}, base + list(overrides)))


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray runtime (2 CPUs, no dashboard), shared by the `ray` tests."""
    import ray

    from distpg.doctor import ray_env_defaults

    ray_env_defaults()  # as distpg's own runs have them
    # so workers can import tests.user_task: the runtime's processes inherit this environment (a runtime_env's
    # env_vars would do it too, but then Ray starts every worker through its runtime-env setup process, ~0.3 s of
    # CPU more per actor, and the tests start ~150 actors); put back once they have started, for the subprocesses
    # later tests start
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), *filter(None, [saved])])
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_run(ray_session, tmp_path_factory):
    """`small_run(*overrides)`: (folder, summary) of `train(small_config(*overrides), folder)` on the shared
    runtime, trained once per session for each resolved config, so that the tests that train the same config (a
    plain sync run, say) share one run. Read the folder; never change it (copy it first)."""
    from distpg.config import dump_config
    from distpg.orchestrator import train

    runs = {}

    def run(*overrides: str) -> tuple[Path, dict]:
        cfg = small_config(*overrides)
        key = dump_config(cfg)
        if key not in runs:
            folder = tmp_path_factory.mktemp("small-run") / "run"
            runs[key] = folder, train(cfg, folder)
        return runs[key]

    return run


def train_stopped_after_checkpoint_then_resumed(cfg, run, step: int, monkeypatch) -> None:
    """`train(cfg, run)` stopped by an error right after it saved the checkpoint of `step`, then
    `train(cfg, run, resume=True)`: a run cut at a known checkpoint and continued from it."""
    import pytest

    from distpg.orchestrator import Trainer, train

    save = Trainer.save

    def save_then_fail(self, at, run_state=None):
        save(self, at, run_state)
        if at == step:
            raise RuntimeError(f"stopped after the checkpoint of step {step}")

    with monkeypatch.context() as m:
        m.setattr(Trainer, "save", save_then_fail)
        with pytest.raises(RuntimeError, match="stopped after"):
            train(cfg, run)
    train(cfg, run, resume=True)


COMMANDS = """
import json, os, sys, time
from distpg.cli import main
for i, (args, env) in enumerate(json.loads(sys.argv[1])):
    os.environ.update(env)
    print(f"=== command {i}", flush=True)
    print(f"=== command {i}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    code = 0 if code is None else code if isinstance(code, int) else 1  # as the exit status of `sys.exit(code)`
    print(f"=== exit {code} {time.perf_counter() - t0:.3f}", flush=True)
"""


def distpg_commands(*commands: tuple[list[str], dict], timeout: float,
                    env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """`distpg ARGS` with ENV set for each (ARGS, ENV) of `commands`, one after another by `cli.main` in one
    process of their own (a fresh interpreter, but its start and torch's import paid once, not per command), in
    the repository's folder, with `env` (default: this process's less $RAY_ADDRESS): a CompletedProcess for each,
    with its exit status, what it printed and the `seconds` it took. A command that kills the process (as Ray's
    C++ checks do) ends the list there: it and the commands after it get the process's own output and status."""
    import json

    root = Path(__file__).resolve().parent.parent
    if env is None:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    e = {**env, "PYTHONPATH": str(root)}
    p = subprocess.run([sys.executable, "-c", COMMANDS, json.dumps([[list(a), more] for a, more in commands])],
                       capture_output=True, text=True, timeout=timeout, cwd=root, env=e)
    outs, errs = p.stdout.split("=== command ")[1:], p.stderr.split("=== command ")[1:]
    done = []
    for (args, _), out, err in zip(commands, outs, errs):
        out, err = out.split("\n", 1)[1], err.split("\n", 1)[1]
        if "\n=== exit " not in "\n" + out:
            break
        out, status = out.rsplit("=== exit ", 1)
        code, seconds = status.split()[:2]  # (the last command's: then what the process printed as it ended)
        done.append(subprocess.CompletedProcess(args, int(code), out, err))
        done[-1].seconds = float(seconds)
    for args, _ in commands[len(done):]:
        done.append(subprocess.CompletedProcess(args, p.returncode, p.stdout, p.stderr))
        done[-1].seconds = None
    return done
