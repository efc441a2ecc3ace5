"""`prompts`: your own prompts from a file, scored by your own reward function, without writing a task class.

    task:
      name: prompts
      prompts_path: configs/data/reverse_words.jsonl   # or .parquet
      reward: distpg.examples.rewards:match_reference  # module:attr

The file has one row per prompt: a `prompt` (text) and optionally a `reference` (any JSON value, e.g. the
answer; null when absent), and any other columns. JSONL files (.jsonl, .ndjson, or .json, which datasets'
`Dataset.to_json` writes) hold one JSON object per line (blank lines are skipped); a .json file may also hold
one array of objects (pandas' `to_json(orient="records")`); Parquet files are read with pyarrow. A prompt
that appears twice is kept once (its first row), and must have the same reference both times (and, for a
batched reward function, the same other columns).

Reward, imported from "module:attr" (the module must be importable by the workers: in the current folder,
installed, on PYTHONPATH, or in a job's working dir), in one of two forms:
- one sample: `reward(prompt, completion, reference) -> float`; the other columns are ignored (the run says so);
- a batch, as TRL's reward functions are written (a `completions` parameter): called as
  `reward(prompts=[...], completions=[...], completion_ids=[...], COLUMN=[...], ...)` with each completion's
  token ids and each column of the file but `prompt` as a list aligned with the samples (None where a row lacks
  it), returning one float (or None) per sample; what it does not name goes into its `**kwargs`.
Several functions (a list in task.reward, of either form): a sample's reward is their sum weighted by
task.reward_weights (1 each by default), as TRL sums its reward_funcs; a function returning None for a sample
leaves it out of that sum, and a sample none of them scores is masked. Each one's values are kept beside the
sum (the rollouts' `reward/NAME` columns, the `rollout/rewards/NAME/mean` and `/std` metrics, NAME being the
function's attribute).
They run in a child process with a timeout (`rollout.reward_isolation: auto`), so a crash or a hang costs a
batch, not the run.

Held out: `task.num_eval` distinct prompts, picked once with `task.eval_seed`, are the evaluation prompts
(`distpg eval`); training samples prompts (with repeats) from the rest only.

Tokenizer: the policy's (model.init_from's tokenizer.json) when given, else a character tokenizer over every
character of the prompts and references (with a batched reward function, also of the other columns' text and
numbers, where a TRL dataset keeps its answers), so a fresh model can be trained on the file too.

Completion budget: the longest reference in tokens + 1 (room for eos), or 32 tokens when no row has a
reference; `rollout.max_new_tokens` overrides it. A reference that is not a string counts as its JSON text
(`3` -> "3"), as `distpg eval` shows it. `task.max_prompt_tokens` leaves out the rows whose prompt is longer
(before the held-out split), so that a file with a few long prompts fits a model's context.
"""

from __future__ import annotations

import inspect
import json
import math
from functools import partial
from pathlib import Path

import numpy as np

from distpg.config import reward_specs
from distpg.rewards import RewardFunction, score_each
from distpg.tasks.base import load_attr
from distpg.tokenizer import CharTokenizer, Tokenizer

DEFAULT_MAX_NEW_TOKENS = 32  # without references to measure


def reference_text(ref: object) -> str:
    """A reference as text: a string as it is, another JSON value as JSON, none as ""; a Parquet value that JSON
    has no form for (a date) as its text."""
    if ref is None or isinstance(ref, str):
        return ref or ""
    if isinstance(ref, (dict, list, tuple, bool, int, float)):
        return json.dumps(ref, default=str)  # a date inside a Parquet struct or list: as its text
    return str(ref)  # a value JSON has no form for (a Parquet date, time, decimal): its text, 2024-01-31


def read_prompts(path: str | Path) -> tuple[list[tuple[str, object]], list[str]]:
    """(prompt, reference or None) rows of a JSONL or Parquet file, in file order, duplicates dropped, and the
    names of the file's other columns (sorted), which only a batched (TRL-style) reward function gets.

    Raises:
        ValueError naming task.prompts_path and the row at fault.
    """
    rows, columns, _ = read_rows(path, other_columns=False)
    return [(p, ref) for p, ref, _ in rows], [c for c in columns if c != "reference"]


def read_rows(path: str | Path, other_columns: bool = True) -> tuple[list[tuple[str, object, dict]], list[str],
                                                                    str | None]:
    """`read_prompts` with each row's other columns: (prompt, reference or None, {column: value}) (a row's
    first occurrence where a prompt repeats; {} without `other_columns`, when no Parquet column but 'prompt'
    and 'reference' is read), the file's columns but 'prompt', sorted ('reference' among them where the file
    has one), and, where a repeated prompt's rows differ in another column, an error naming the first such
    pair (None if none do): only a batched reward function gets those columns, so only it is refused the
    file."""
    path = Path(path)
    where = f"task.prompts_path={str(path)!r}"
    if path.is_dir():
        held = sorted(p.name for p in path.iterdir())
        raise ValueError(f"{where}: a folder, not a file; give one .jsonl, .ndjson or .parquet file (it holds "
                         f"{', '.join(held[:4]) or 'nothing'}{' ...' if len(held) > 4 else ''})")
    if not path.is_file():
        raise ValueError(f"{where}: no such file")
    suffix = path.suffix.lower()
    unit = "line"  # rows are named as an editor finds them: by line in JSON Lines (blank lines count)
    if suffix == ".json" and _is_json_array(path):  # pandas' to_json(orient="records"): [{...}, {...}]
        rows, columns = _read_json_array(path, where, other_columns)
        unit = "item"
    elif suffix in (".jsonl", ".ndjson", ".json"):  # .json: JSON Lines, as datasets' Dataset.to_json writes it
        rows, columns = _read_jsonl(path, where, other_columns)
    elif suffix in (".parquet", ".pq"):
        rows, columns = _read_parquet(path, where, other_columns)
        unit = "row"
    else:
        raise ValueError(f"{where}: unknown file type {suffix or '(none)'!r}; allowed: .jsonl, .ndjson, .json "
                         "(JSON Lines, or one array of objects), .parquet")
    out: dict[str, tuple[int, object, dict]] = {}
    conflict = None
    for n, prompt, reference, extra in rows:
        if not isinstance(prompt, str) or not prompt:
            chat = isinstance(prompt, (list, tuple)) and bool(prompt) and all(
                isinstance(m, dict) and "role" in m and "content" in m for m in prompt)
            raise ValueError(f"{where}: {unit} {n}: 'prompt' must be non-empty text, got {prompt!r}" + (
                "; a conversational prompt (a list of messages, as in TRL's conversational datasets) is not "
                "templated by distpg: store the text the model reads, e.g. tokenizer.apply_chat_template(messages, "
                "tokenize=False, add_generation_prompt=True), in 'prompt'" if chat else ""))
        if prompt in out and out[prompt][1] != reference:
            raise ValueError(f"{where}: {unit}s {out[prompt][0]} and {n} have the same prompt {prompt[:60]!r} but "
                             "different references; keep one")
        if prompt in out and conflict is None:
            first = out[prompt][2]
            col = next((c for c in sorted(first.keys() | extra.keys())
                        if not _same(first.get(c), extra.get(c))), None)
            if col is not None:
                conflict = (f"{where}: {unit}s {out[prompt][0]} and {n} have the same prompt {prompt[:60]!r} but "
                            f"different {col!r} values ({first.get(col)!r} and {extra.get(col)!r}), and a batched "
                            "reward function gets one row's columns for a prompt; keep one of the rows")
        out.setdefault(prompt, (n, reference, extra))
    if not out:
        raise ValueError(f"{where}: the file has no rows")
    return [(p, ref, extra) for p, (_, ref, extra) in out.items()], sorted(columns - {"prompt"}), conflict


def _column_text(value: object) -> str:
    """A column's value as the policy would write it: text as it is, a number as its JSON text; "" for anything
    else (None, lists, structs, dates), whose characters the character tokenizer does not take."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return json.dumps(value)
    return ""


def _same(a: object, b: object) -> bool:
    """Equal column values, NaN equal to NaN (a float column's missing value in many Parquet files)."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _read_jsonl(path: Path, where: str, other_columns: bool) -> tuple[list[tuple[int, object, object, dict]],
                                                                      set[str]]:
    """(line number, prompt, reference, other keys) of each non-blank line, and every key of the lines' objects."""
    rows, keys = [], set()
    with open(path, "rb") as f:  # bytes, decoded line by line, so that an encoding error names its line
        for n, raw in enumerate(f, 1):
            try:  # a byte-order mark opening the file (Windows editors write one) is not part of the first line
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: line {n} is not UTF-8 text ({e.reason} at byte {e.start} of the line); "
                                 "JSONL is UTF-8: save the file in that encoding") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: line {n} is not JSON: {e}") from None
            rows.append(_json_row(obj, n, f"{where}: line {n}", line.strip(), other_columns, keys))
    return rows, keys


def _json_row(obj: object, n: int, label: str, shown: str, other_columns: bool,
              keys: set[str]) -> tuple[int, object, object, dict]:
    """(n, prompt, reference, other keys) of one JSON row object, its keys added to `keys`; refused, naming
    `label` and showing `shown`, unless it is an object with a 'prompt' key."""
    if not isinstance(obj, dict) or "prompt" not in obj:
        raise ValueError(f"{label}: expected an object with a 'prompt' key, got {shown[:80]}")
    keys.update(obj)
    return (n, obj["prompt"], obj.get("reference"),
            {k: v for k, v in obj.items() if k not in ("prompt", "reference")} if other_columns else {})


def _is_json_array(path: Path) -> bool:
    """Does the file open with '[' (after a byte-order mark and white space)?"""
    with open(path, "rb") as f:
        head = f.read(4096)
    return head.removeprefix(b"\xef\xbb\xbf").lstrip()[:1] == b"["


def _read_json_array(path: Path, where: str, other_columns: bool) -> tuple[list[tuple[int, object, object, dict]],
                                                                           set[str]]:
    """`_read_jsonl` for a .json file that holds one JSON array of row objects; rows are numbered from 1."""
    try:
        items = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start}); JSON is UTF-8: save the file "
                         "in that encoding") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON: {e}") from None
    if not isinstance(items, list):  # e.g. '[1] [2]' fails above; a lone array is the only form here
        raise ValueError(f"{where}: expected an array of objects with a 'prompt' key")
    keys: set[str] = set()
    rows = [_json_row(obj, n, f"{where}: item {n}", json.dumps(obj), other_columns, keys)
            for n, obj in enumerate(items, 1)]
    return rows, keys


def _read_parquet(path: Path, where: str, other_columns: bool) -> tuple[list[tuple[int, object, object, dict]],
                                                                        set[str]]:
    """(row number, prompt, reference, other columns) of each row, and the file's columns; without
    `other_columns` only 'prompt' and 'reference' are read (a file's other columns may be large)."""
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as e:  # pyarrow raises ArrowInvalid and OSError subclasses for a bad file
        raise ValueError(f"{where}: not a readable Parquet file: {e}") from None
    if "prompt" not in names:
        raise ValueError(f"{where}: no 'prompt' column (columns: {', '.join(names)})")
    wanted = [c for c in names if other_columns or c in ("prompt", "reference")]
    table = pq.read_table(path, columns=wanted)
    values = {}
    for c in wanted:
        try:
            values[c] = table.column(c).to_pylist()
        except (ValueError, OverflowError) as e:  # e.g. a timestamp past Python's year 9999
            raise ValueError(f"{where}: column {c!r} ({table.schema.field(c).type}) has a value Python cannot "
                             f"hold: {e}") from None
    prompts, refs = values.pop("prompt"), values.pop("reference", None) or [None] * table.num_rows
    return [(n, p, r, {c: v[n - 1] for c, v in values.items()}) for n, (p, r) in enumerate(zip(prompts, refs), 1)], \
        set(names)


# what TRL's GRPOTrainer also passes a reward function (recent versions log_extra and log_metric too, and
# environments where it has some), and distpg does not
TRL_ONLY = ("trainer_state", "log_extra", "log_metric", "environments")
PASSED = ("prompts", "completions", "completion_ids")  # what a batched function gets beside the file's columns


def function_names(specs: list[str]) -> list[str]:
    """Each reward function's name (the rollouts' `reward/NAME` columns, the `rollout/rewards/NAME/*` metrics):
    its attribute, as TRL names a function by its __name__, or 'module.attr' where two share an attribute."""
    attrs = [s.partition(":")[2] for s in specs]
    return [a if attrs.count(a) == 1 else s.replace(":", ".") for s, a in zip(specs, attrs)]


def load_reward(spec: str | None):
    """The function named by task.reward ("module:attr") and whether it scores a whole batch, checked to accept
    either (prompt, completion, reference), one sample, or TRL's keyword call with lists, batched: a function
    with a `completions` parameter is called as fn(prompts=[...], completions=[...], completion_ids=[...],
    COLUMN=[...] for each of the file's columns) and returns one value per sample (that call is checked by
    `check_batch_call` once the columns are known).

    Raises:
        ValueError naming task.reward and what is wrong.
    """
    example = "e.g. distpg.examples.rewards:match_reference"
    if not spec:
        raise ValueError(f"task.name=prompts needs task.reward: 'module:attr' of a function reward(prompt, "
                         f"completion, reference) -> float, {example}")
    try:
        fn = load_attr(spec, "task.reward")
    except ValueError as e:
        raise ValueError(f"{e} ({example})") from None
    attr = spec.partition(":")[2]
    if not callable(fn):
        raise ValueError(f"task.reward={spec!r}: {attr!r} is a {type(fn).__name__}, not a function")
    try:
        sig = inspect.signature(fn)
    except ValueError:  # no signature to inspect (some builtins): trust it to take one sample
        return fn, False
    if "completions" in sig.parameters:  # TRL's reward functions: reward(prompts, completions, **columns)
        return fn, True
    try:
        sig.bind("prompt", "completion", None)
    except TypeError:
        raise ValueError(f"task.reward={spec!r}: {attr}{sig} cannot be called as reward(prompt, completion, "
                         "reference), nor, batched, as TRL calls a reward function (a 'completions' "
                         "parameter)") from None
    return fn, False


def check_batch_call(spec: str, fn, columns: list[str]) -> None:
    """Raise a ValueError naming task.reward unless the batched function `fn` (`load_reward`) takes the call
    fn(prompts=[...], completions=[...], completion_ids=[...], COLUMN=[...] for each of the file's `columns`)."""
    attr, sig = spec.partition(":")[2], inspect.signature(fn)
    call = f"{attr}(prompts=[...], completions=[...], completion_ids=[...]{''.join(f', {c}=[...]' for c in columns)})"
    batch = f"task.reward={spec!r}: {attr}{sig} takes a batch (it has a 'completions' parameter), so it is called"
    clash = [c for c in columns if c in PASSED]
    if clash:  # the call would pass it twice (TRL's fails the same way)
        raise ValueError(f"{batch} with prompts=[...], completions=[...] and completion_ids=[...], and the file has a "
                         f"column {clash[0]!r} too, which that call cannot also pass; rename the column")
    trl_only = [n for n, p in sig.parameters.items() if n in TRL_ONLY and n not in columns
                and p.default is inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD]
    needed = [n for n, p in sig.parameters.items() if n not in (*PASSED, *columns, *TRL_ONLY)
              and p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if needed:  # a column the file does not have (TRL's would fail on it too)
        raise ValueError(f"{batch} as {call}, without {needed[0]!r}, which it requires: the file has no column "
                         f"{needed[0]!r}")
    if trl_only:
        raise ValueError(f"{batch} as {call}, without {trl_only[0]!r}, which it requires: TRL's GRPOTrainer "
                         "passes it, distpg passes the prompts, the completions, their token ids and the file's "
                         "columns; "
                         "give the parameter a default (e.g. None)")
    try:
        sig.bind(prompts=[], completions=[], completion_ids=[], **{c: [] for c in columns})
    except TypeError as e:
        raise ValueError(f"{batch} as {call} with the file's columns, and that call fails: {e}; add **kwargs "
                         "to take the columns it does not use, as TRL's reward functions do") from None


def _encode(tokenizer: Tokenizer, text: str, what: str, path) -> list[int]:
    """`tokenizer.encode(text)`, or a ValueError naming the file and the text it cannot encode."""
    try:
        return tokenizer.encode(text)
    except Exception as e:  # the tokenizers library raises a bare Exception (a WordLevel vocabulary without [UNK])
        raise ValueError(f"task.prompts_path={str(path)!r}: the policy's tokenizer cannot encode the {what} "
                         f"{text[:60]!r} ({e}); a character policy exported by distpg knows only the characters "
                         "of its own run") from None


class PromptsTask:
    """Prompts (and references) from a file, a user's reward function, a fixed held-out split."""

    name = "prompts"

    def __init__(self, cfg, tokenizer: Tokenizer | None = None, eval_only: bool = False) -> None:
        """`eval_only`: every prompt of the file is an evaluation prompt (`distpg eval --prompts FILE`: a test
        set scored with the run's tokenizer and reward functions), none is trained on."""
        if not cfg.prompts_path:
            raise ValueError("task.name=prompts needs task.prompts_path: a JSONL or Parquet file with a 'prompt' "
                             "column (and optionally 'reference')")
        specs = reward_specs(cfg)
        if not specs:
            load_reward(None)  # raises, saying what task.reward takes
        loaded = [(spec, *load_reward(spec)) for spec in specs]  # (spec, function, batched)
        batched = any(b for _, _, b in loaded)
        # per-sample functions read no column but 'prompt' and 'reference': the others are not even read
        rows, columns, conflict = read_rows(cfg.prompts_path, other_columns=batched)
        # one that scores a sample gets the reference only; a batched function gets every column
        self.ignored_columns, answers = [c for c in columns if c != "reference"], ""
        if batched:
            for spec, fn, b in loaded:
                if b:
                    check_batch_call(spec, fn, columns)
            if conflict:
                raise ValueError(conflict)
            self.ignored_columns = []
            self.columns = {p: {"reference": ref, **extra} for p, ref, extra in rows}
            self.column_names = columns
            # a TRL dataset holds its answers in a column of its own ('answer', 'solution'): the policy must be
            # able to write them, so the character tokenizer covers the other columns' text too
            answers = "".join(_column_text(v) for _, _, extra in rows for v in extra.values())
        weights = cfg.reward_weights or [1.0] * len(specs)
        self.reward_functions = [RewardFunction(name, partial(self._batch if b else self._one, fn), b, float(w), b)
                                 for name, (_, fn, b), w in zip(function_names(specs), loaded, weights)]
        rows = [(p, ref) for p, ref, _ in rows]
        self.without_reference = sum(r is None for _, r in rows)  # rows whose reward gets reference=None
        if tokenizer is None:
            tokenizer = CharTokenizer("".join(p + reference_text(r) for p, r in rows) + answers)
        self.tokenizer = tokenizer
        lengths = [len(_encode(tokenizer, p, "prompt", cfg.prompts_path)) for p, _ in rows]  # tokens
        self.num_rows, self.dropped = len(rows), 0
        if cfg.max_prompt_tokens is not None:
            if cfg.max_prompt_tokens < 1:
                raise ValueError(f"task.max_prompt_tokens={cfg.max_prompt_tokens}: must be at least 1 (or null)")
            kept = [i for i, n in enumerate(lengths) if n <= cfg.max_prompt_tokens]
            self.dropped = len(rows) - len(kept)
            if not kept:
                raise ValueError(f"task.max_prompt_tokens={cfg.max_prompt_tokens}: every prompt of "
                                 f"{cfg.prompts_path!r} is longer (the shortest has {min(lengths)} tokens)")
            rows, lengths = [rows[i] for i in kept], [lengths[i] for i in kept]
        self.references = dict(rows)
        if eval_only:
            held_out = set(range(len(rows)))
        elif len(rows) <= cfg.num_eval:
            raise ValueError(f"task.prompts_path={cfg.prompts_path!r} has {len(rows)} distinct prompts, too few to "
                             f"hold out task.num_eval={cfg.num_eval} for evaluation and train on the rest; "
                             "lower task.num_eval")
        else:
            held_out = set(np.random.default_rng(cfg.eval_seed).permutation(len(rows))[: cfg.num_eval].tolist())
        self._eval = [p for i, (p, _) in enumerate(rows) if i in held_out]  # in file order
        self._train = [p for i, (p, _) in enumerate(rows) if i not in held_out]
        self.max_prompt_len = max(lengths)
        self.longest = rows[lengths.index(self.max_prompt_len)][0]
        refs = [reference_text(r) for _, r in rows if r is not None]
        if eval_only:  # scored with the run's completion budget; a reference is only compared as text
            self.max_new_tokens = None
        else:
            self.max_new_tokens = (max(len(_encode(tokenizer, r, "reference", cfg.prompts_path)) for r in refs) + 1
                                   if refs else DEFAULT_MAX_NEW_TOKENS)

    def sample_prompts(self, rng: np.random.Generator, n: int) -> list[str]:
        """n training prompts, drawn uniformly with repeats; never a held-out one."""
        return [self._train[i] for i in rng.integers(0, len(self._train), n)]

    def eval_prompts(self) -> list[str]:
        return list(self._eval)

    def reward(self, prompt: str, completion: str) -> float:
        """One sample's reward (the weighted sum of its functions' values). Raises ValueError where a function
        fails on it or none scores it (training masks such a sample)."""
        rewards, ok, errors, _ = score_each(self, [prompt], [completion])
        if not ok[0]:
            raise ValueError(errors[0])
        return rewards[0]

    def _one(self, fn, prompt: str, completion: str):
        """A per-sample function's value: its call with the prompt's reference."""
        return fn(prompt, completion, self.references[prompt])

    def _batch(self, fn, prompts: list[str], completions: list[str], completion_ids: list | None = None) -> list:
        """A batched (TRL-style) function's values: its call with the batch's prompts, completions and their
        token ids (as TRL's, the <eos> included where one was sampled), and each of the file's columns as a list
        aligned with them (None where a row lacks the column)."""
        columns = {c: [self.columns[p].get(c) for p in prompts] for c in self.column_names}
        return fn(prompts=list(prompts), completions=list(completions), completion_ids=completion_ids, **columns)

    def target(self, prompt: str) -> str | None:
        """The reference as text, what `distpg eval` shows and counts exact matches against; None without one
        (no exact match to count: an empty completion is not a match of a missing reference)."""
        ref = self.references[prompt]
        return None if ref is None else reference_text(ref)
