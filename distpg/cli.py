"""The `distpg` command: train, eval, export, plot.

Errors a user can fix (bad config, missing task, a reward function that always fails, an unreachable
cluster) end with one paragraph naming the problem and exit code 2 (config) or 1 (run), never a
traceback wall.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import time
from pathlib import Path

from distpg.cliargs import number
from distpg.config import ConfigError, describe, in_job_copy, load_config, load_run_config
from distpg.stopping import as_signalled, how_stopped, signals_stop_command, stop_signal


def _train(args) -> int:
    from distpg.checkpoint import resume_hint
    from distpg.orchestrator import TrainingError, train

    if args.resume:
        run_dir = Path(args.resume)
        if args.config or args.set:
            raise ConfigError(f"--resume continues a run with the config in its folder; drop CONFIG and --set (to "
                              f"change a setting, e.g. run.steps, edit {str(run_dir / 'config.yaml')!r} first: the "
                              "resume names each change)")
        if args.run_dir:  # as cluster/submit.sh says: it was ignored, the run going on in the --resume folder
            raise ConfigError(f"--resume continues the run in {str(run_dir)!r} itself; drop --run-dir (to start a "
                              "new run from that run's config: distpg train RUN_DIR/config.yaml --run-dir NEW)")
        if not (run_dir / "config.yaml").exists():
            raise ConfigError(f"--resume {str(run_dir)!r}: no config.yaml there, so it is not a distpg run folder")
        cfg = load_run_config(run_dir / "config.yaml")
    else:
        if in_job_copy() and not (args.run_dir and Path(args.run_dir).is_absolute()):
            raise ConfigError(f"this job runs in Ray's temporary copy of its working dir ({os.getcwd()}), which jobs "
                              "share and the cluster deletes: a run folder there (the default runs/..., or a "
                              "relative --run-dir) would be lost; pass --run-dir with an absolute path on the head")
        if args.run_dir is not None and not args.run_dir.strip():  # '' took the default folder, unsaid
            raise ConfigError("--run-dir '': give a folder, or leave --run-dir out for runs/TASK-TIME")
        cfg = load_config(args.config, args.set)
        run_dir = Path(args.run_dir or f"runs/{cfg.task.name.replace(':', '_')}-{time.strftime('%Y%m%d-%H%M%S')}")
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"--run-dir {str(run_dir)!r} is a file; give a folder (created if missing)")
    try:
        summary = train(cfg, run_dir, address=args.address, resume=bool(args.resume))
    except KeyboardInterrupt as e:
        return _stopped(e, resume_hint(run_dir, cfg.run.steps))
    except BrokenPipeError:  # `distpg train | head`, or a pager quit: the run is stopped (and cleaned up) as a
        # pipe's writer is, but said with the resume hint instead of a traceback
        _stdout_gone()
        hint = resume_hint(run_dir, cfg.run.steps)
        print(f"distpg: stopped: its standard output was closed (broken pipe); {hint}", file=sys.stderr, flush=True)
        return 141
    except TrainingError as e:
        hint = resume_hint(run_dir, cfg.run.steps, e.last_step)
        print(f"distpg: training failed: {e}\n{hint}", file=sys.stderr, flush=True)
        return 1
    final = summary["final_reward"]
    if "nothing_to_resume" in summary:
        print(f"distpg: nothing to resume: {summary['nothing_to_resume']}; final reward "
              f"{'n/a' if final is None else format(final, '.3f')}", flush=True)
        return 0
    print(f"distpg: done after {summary['steps']} steps; final reward "
          f"{'n/a' if final is None else format(final, '.3f')}; run folder {summary['run_dir']}", flush=True)
    return 0


def _eval(args) -> int:
    from distpg import checkpoint
    from distpg.evaluate import evaluate, load_initial_policy, load_policy, resolve_checkpoint
    from distpg.rewards import RewardError

    if args.initial:  # the policy the run started from: the "before" of a before/after comparison
        ckpt = None
        if not (Path(args.path) / "config.yaml").is_file():
            raise ConfigError(f"distpg eval --initial: {args.path!r} is not a run folder (no config.yaml there); "
                              "--initial scores the policy a run folder's config starts from")
    else:
        _, ckpt = resolve_checkpoint(Path(args.path))
    out = Path(args.json) if args.json is not None else None  # "" is refused below, not ignored
    if out is not None and out.is_dir():
        raise ConfigError(f"distpg eval: --json {args.json!r} is a folder; give a file name (e.g. {out / 'eval.json'})")
    if out is not None and not out.parent.is_dir():
        raise ConfigError(f"distpg eval: --json {args.json!r}: no folder {str(out.parent)!r}; it must name a file in "
                          "an existing folder")
    decoding = 'greedy' if args.temperature == 0 else f'temperature {args.temperature:g}'
    if ckpt is None:
        cfg, model = load_initial_policy(Path(args.path))
        step = 0
        print(f"the initial policy of {args.path} (step 0 of run.steps={cfg.run.steps}, run.seed={cfg.run.seed}, "
              f"{f'model.init_from={cfg.model.init_from}' if cfg.model.init_from else 'initialised from run.seed'})"
              f"; {decoding}")
    else:
        cfg, model = load_policy(ckpt)
        step = checkpoint.run_state(ckpt)["step"]
        # which policy this is: RUN_DIR alone means its latest checkpoint, which a run that stopped early (or
        # is still going) does not say
        print(f"checkpoint {ckpt} (step {step} of run.steps={cfg.run.steps}, run.seed={cfg.run.seed}); {decoding}")
    try:
        res = evaluate(cfg, model, temperature=args.temperature, seed=args.seed, prompts_path=args.prompts)
    except RewardError as e:
        print(f"distpg: eval failed: {e}", file=sys.stderr)
        return 1
    failed = f" ({res.failed} of {res.num_prompts} rewards failed, left out)" if res.failed else ""
    if res.first_failure is not None:  # the error itself, which the samples' 'reward failed' does not say
        print(f"distpg: warning: {res.failed} of the {res.num_prompts} rewards failed; the first {res.first_failure}",
              flush=True)
    which, one = ("held-out prompts", "held-out prompt") if args.prompts is None else \
        (f"prompts of {args.prompts}", "prompt")
    if res.exact_match is None:
        exact = f"exact_match n/a (no {one} has a reference)"
    else:
        partly = f" (of the {res.with_target} with a reference)" if res.with_target < res.num_prompts else ""
        exact = f"exact_match {res.exact_match:.4f}{partly}"
    if res.left_out:
        print(f"left out {res.left_out} prompt{'s' if res.left_out > 1 else ''} of {args.prompts} longer than the "
              "model holds with the run's completion budget (model.n_positions, task.max_prompt_tokens)")
    parts = "".join(f" | {name} {'n/a' if v is None else f'{v:.4f}'}" for name, v in res.reward_parts.items())
    print(f"{which}: {res.num_prompts} | reward_mean {res.reward_mean:.4f}{failed}{parts} | {exact}")
    if out is not None:  # for scripts (a seed study): the figures and every sample, written whole, before the
        # samples print (`| head` closing the pipe then does not lose it)
        record = {"checkpoint": None if ckpt is None else str(ckpt), "step": step, "run_steps": cfg.run.steps,
                  "run_seed": cfg.run.seed,
                  "task": cfg.task.name, "temperature": args.temperature, "seed": args.seed,
                  "num_prompts": res.num_prompts, "reward_mean": res.reward_mean, "exact_match": res.exact_match,
                  "prompts_with_reference": res.with_target, "failed_rewards": res.failed,
                  "first_failure": res.first_failure,
                  "reward_parts": res.reward_parts, "prompts_path": args.prompts, "left_out": res.left_out,
                  "samples": [{"prompt": p, "completion": c, "target": t, "reward": r} for p, c, t, r in res.samples]}
        checkpoint.write_atomic(out, json.dumps(record, indent=1) + "\n")
    for prompt, completion, target, reward in res.samples[: args.samples]:
        shown = "failed" if reward is None else f"{reward:.2f}"
        print(f"  {prompt!r} -> {completion!r} ({'no reference' if target is None else f'target {target!r}'}, "
              f"reward {shown})")
    if out is not None:
        print(f"wrote {out}")
    return 0


def _export(args) -> int:
    from distpg.hf import export_policy

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"distpg export: OUT={args.out!r} is a file; give a folder (created if missing)")
    held = sorted(p.name for p in Path(args.out).iterdir()) if Path(args.out).is_dir() else []
    if held:  # it could be a model folder a run started from, or another export: nothing is overwritten
        raise ConfigError(f"distpg export: OUT={args.out!r} is not empty (it holds {', '.join(held[:4])}"
                          f"{' ...' if len(held) > 4 else ''}); give a new or empty folder")
    out = export_policy(Path(args.path), Path(args.out))
    # the files written, not a fixed list: a run from a GPT-2 folder also gets its tokenizer_config.json, ...
    print(f"wrote {out}: {', '.join(sorted(f.name for f in out.iterdir()))} (transformers: "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r}); distpg: --set model.init_from={out})")
    return 0


def _plot(args) -> int:
    from distpg.plot import plot_runs

    out = plot_runs([Path(r) for r in args.runs], Path(args.out), metric=args.metric, title=args.title,
                    smooth=args.smooth)
    print(f"wrote {out}")
    return 0


def _bench(args) -> int:
    from distpg.bench import run

    with signals_stop_command():
        run(args)
    return 0


def _doctor(args) -> int:
    from distpg.doctor import run

    cfg = load_config(args.config, args.set) if args.config or args.set else None
    return run(args.address, cfg, args.config or "the default config", timeout=args.timeout, as_json=args.json)


def _scale(args) -> int:
    from distpg.scale import main

    with signals_stop_command():
        return main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distpg", description="Policy-gradient RL for language-model policies on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run a training job (local Ray unless --address or $RAY_ADDRESS)")
    t.add_argument("config", nargs="?", help="YAML config (default: the embedded configs/default.yaml)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set task.length=8 (repeatable)")
    t.add_argument("--run-dir", help="run folder (default: runs/TASK-TIMESTAMP)")
    t.add_argument("--address", help="Ray cluster to join instead of starting a local runtime")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest complete checkpoint")
    t.add_argument("--help-config", action="store_true", help="list every config field with its default and doc")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="score a trained policy on the held-out prompts")
    e.add_argument("path", help="a run folder (uses its latest checkpoint) or a checkpoint folder")
    e.add_argument("--samples", type=number(int, 0), default=8, help="sample completions to print")
    e.add_argument("--temperature", type=number(float, 0), default=0.0, help="0 decodes greedily")
    e.add_argument("--seed", type=number(int, 0, maximum=2**64 - 1), default=0,
                   help="seed of the sampling with --temperature above 0 (as run.seed: 0 to 2**64 - 1)")
    e.add_argument("--json", metavar="FILE", help="also write the figures and every held-out sample (prompt, "
                   "completion, target, reward; null where the reward failed) to FILE as JSON")
    e.add_argument("--initial", action="store_true", help="score the policy the run folder's config starts from "
                   "(model.init_from, or its run.seed initialisation) instead of a checkpoint: the baseline")
    e.add_argument("--prompts", metavar="FILE", help="score every prompt of FILE (JSONL or Parquet, as "
                   "task.prompts_path) instead of the held-out prompts: a test set, for a run of task.name=prompts, "
                   "with its reward functions and completion budget")
    e.set_defaults(func=_eval)

    x = sub.add_parser("export", help="write a policy as a Hugging Face GPT-2 folder (opens with transformers)")
    x.add_argument("path", help="a run folder (uses its latest checkpoint) or a checkpoint folder")
    x.add_argument("out", help="folder to write config.json, model.safetensors and tokenizer.json into")
    x.set_defaults(func=_export)

    pl = sub.add_parser("plot", help="plot learning curves of run folders into a PNG (needs matplotlib)")
    pl.add_argument("runs", nargs="+", help="run folders")
    pl.add_argument("-o", "--out", default="curve.png", help="PNG to write")
    pl.add_argument("--metric", default="rollout/reward_mean",
                    help="a metric of metrics.jsonl, or an eval/ one (eval/reward_mean, eval/exact_match) of "
                         "eval.jsonl (run.eval_every)")
    pl.add_argument("--title")
    pl.add_argument("--smooth", type=number(int, 1), default=1,
                    help="trailing moving average over this many points (steps, or evaluations)")
    pl.set_defaults(func=_plot)

    from distpg.bench import add_arguments as bench_arguments

    b = sub.add_parser("bench", help="benchmarks, each a ratio against a reference measured in the same run")
    bench_arguments(b)
    b.set_defaults(func=_bench)

    d = sub.add_parser("doctor", help="check a Ray cluster (nodes, resources, versions, dashboard, auth) before a run")
    d.add_argument("config", nargs="?", help="also check that this config's actors fit the cluster")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    d.add_argument("--address", help="Ray cluster (GCS address; default: $RAY_ADDRESS, else a local runtime)")
    d.add_argument("--timeout", type=number(float, 0, above=True), default=60.0,
                   help="seconds to wait for the cluster and each node")
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    d.set_defaults(func=_doctor)

    from distpg.scale import add_arguments as scale_arguments

    sc = sub.add_parser("scale", help="scaling sweep over rollout workers (and nodes): throughput, efficiency, plot")
    scale_arguments(sc)
    sc.set_defaults(func=_scale)
    return p


def _modules_from_cwd() -> None:
    """Let `task.name=module:attr` (and a reward function's spec) name a module in the current folder, as
    `python -m` would, with no PYTHONPATH: the folder goes last on sys.path, so installed packages win. Ray
    puts the driver's current folder on the sys.path of the workers it starts for this job (not for a job
    submitted with a working dir, whose folder the workers get instead)."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.append(cwd)


def _job_hint(message: str) -> str:
    """A note for a path that a job did not find in its copy of the working dir."""
    if not in_job_copy() or not any(s in message for s in ("no such file", "is not a folder")):
        return ""
    return (f" (this job runs in Ray's copy of its working dir, {os.getcwd()}, which leaves out what .gitignore and "
            "the runtime env's excludes list, such as runs/: give such a path as an absolute path on the head)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _modules_from_cwd()
    try:
        if getattr(args, "help_config", False):
            print(describe(args.config, args.set))
            return 0
        return args.func(args)
    except (ConfigError, FileNotFoundError, ImportError, *_loaded("distpg.checkpoint", "CheckpointError")) as e:
        print(f"distpg: error: {e}{_job_hint(str(e))}", file=sys.stderr)
        return 2
    except _loaded("distpg.orchestrator", "TrainingError") as e:
        print(f"distpg: training failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # `distpg scale` stopped in one of its runs, a Ctrl-C in `distpg eval`
        return _stopped(e)
    except BrokenPipeError:  # `distpg eval RUN | head`: the reader has what it wanted
        _stdout_gone()
        return 141
    except OSError as e:  # a path that cannot be written: a read-only or full disk, a file where a folder goes
        print(f"distpg: error: {os_error(e)}", file=sys.stderr)
        return 1


def os_error(e: OSError) -> str:
    """An OSError as one line naming its path(s): '[Errno 30] Read-only file system: 'ro/run''."""
    paths = " -> ".join(repr(str(p)) for p in (e.filename, e.filename2) if p is not None)
    return f"{e.strerror or type(e).__name__}" + (f": {paths}" if paths else "") + \
        (f" (errno {e.errno})" if e.errno is not None else "")


def _stopped(e: KeyboardInterrupt, then: str = "") -> int:
    """How a command stopped by Ctrl-C, or by a SIGTERM or SIGHUP that `stopping.signals_interrupt` turned
    into KeyboardInterrupt(its name) (`distpg train`, each run of `distpg scale`), ends: said on stderr, with
    `then` after it, and exit status 130, or 128 + the signal's number (143, 129) as for a process the signal
    ended. The signal is ignored from here on: the runtime is cleaned up, and a repeat would only lose the
    message."""
    e = as_signalled(e)  # a bare one that Ray raised on SIGTERM or SIGHUP
    sig, how = stop_signal(e), how_stopped(e)
    if sig is not None:
        signal.signal(sig, signal.SIG_IGN)
    try:  # after a SIGHUP, to /dev/null where the terminal hung up
        print(f"distpg: {how}{f'; {then}' if then else ''}", file=sys.stderr, flush=True)
    except OSError:  # a terminal that hung up without a SIGHUP to say so
        pass
    return 128 + sig if sig is not None else 130


def _stdout_gone() -> None:
    """After a broken pipe on stdout: what is left in its buffer goes nowhere, so that flushing it at exit does
    not raise again (Python's advice for a program whose output is piped to `head`)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # a stdout without a file descriptor (a test's capture)
        pass


def run() -> None:
    """The `distpg` program (its console script, and `python -m distpg`): `main`, then exit with its code."""
    code = main()
    # The interpreter's last garbage collections at exit walk every object that importing torch made, about half
    # a second of a short run's time; by now every output is closed and Ray shut down, so they are skipped
    # (gc.freeze: what exists now is never collected; exit handlers and plain deallocation still run).
    gc.freeze()
    sys.exit(code)


def _loaded(module: str, name: str) -> tuple[type[BaseException], ...]:
    """`module.name` if the command imported that module (else it cannot have raised it): so that a command
    that needs neither Ray nor pyarrow, such as `distpg bench sampler` on a machine with only torch and
    transformers, does not import them."""
    mod = sys.modules.get(module)
    return (getattr(mod, name),) if mod is not None else ()


if __name__ == "__main__":
    run()
