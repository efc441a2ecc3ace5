"""The `prompts` task: prompts and references from JSONL or Parquet, a user's reward function by
"module:attr", a fixed held-out split, the tokenizer it is given or its own, and errors that name the field."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distpg import rewards
from distpg.config import ConfigError, TaskConfig
from distpg.examples.make_tiny_gpt2 import byte_level_bpe
from distpg.examples.rewards import match_reference
from distpg.tasks import make_task
from distpg.tasks.prompts import read_prompts
from distpg.tokenizer import CharTokenizer

ROWS = [{"prompt": f"say {w}:", "reference": w} for w in
        ["ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen", "ibis", "jay", "koi", "lynx"]]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prompts_task(path, tokenizer=None, **kw):
    kw = {"reward": "tests.user_rewards:length_of_reference", "num_eval": 4, **kw}
    return make_task(TaskConfig(name="prompts", prompts_path=path and str(path), **kw), tokenizer)


@pytest.fixture
def jsonl(tmp_path):
    return write_jsonl(tmp_path / "p.jsonl", ROWS)


def test_jsonl_and_parquet_give_the_same_task(jsonl, tmp_path):
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "extra": 1} for r in ROWS]), parquet)  # other columns ignored
    a, b = prompts_task(jsonl), prompts_task(parquet)
    assert a.eval_prompts() == b.eval_prompts()
    rng_a, rng_b = np.random.default_rng(0), np.random.default_rng(0)
    assert a.sample_prompts(rng_a, 50) == b.sample_prompts(rng_b, 50)
    assert a.target("say lynx:") == b.target("say lynx:") == "lynx"
    assert a.reward("say lynx:", "abcd") == 1.0 and a.reward("say lynx:", "abc") == 0.0  # reward(p, c, ref)


def test_held_out_prompts_are_fixed_by_the_seed_and_never_sampled(jsonl):
    t = prompts_task(jsonl, eval_seed=7)
    held = t.eval_prompts()
    assert len(held) == 4 == len(set(held))
    assert held == prompts_task(jsonl, eval_seed=7).eval_prompts()  # the same split every time
    assert held != prompts_task(jsonl, eval_seed=8).eval_prompts()
    seen = set(t.sample_prompts(np.random.default_rng(0), 2000))
    assert seen == {r["prompt"] for r in ROWS} - set(held)  # every training prompt, no held-out one


def test_char_tokenizer_over_the_file_and_budgets(jsonl):
    t = prompts_task(jsonl)
    assert isinstance(t.tokenizer, CharTokenizer)
    for r in ROWS:  # every prompt and reference encodes
        assert t.tokenizer.decode(t.tokenizer.encode(r["prompt"] + r["reference"])) == r["prompt"] + r["reference"]
    assert t.max_prompt_len == len("say lynx:")
    assert t.max_new_tokens == len("ibis") + 1  # longest reference, then eos


def test_a_reference_that_is_not_a_string_counts_as_its_json_text(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"{i}+{i}=", "reference": 2 * i} for i in range(40, 60)])
    t = prompts_task(path, num_eval=2)
    assert t.max_new_tokens == 4  # "118", then eos
    assert t.target(t.eval_prompts()[0]) == str(2 * int(t.eval_prompts()[0].split("+")[0]))
    assert t.tokenizer.encode("118") and t.tokenizer.encode("100")  # its digits are in the charset ("1" is)


def test_a_parquet_reference_that_json_has_no_form_for_counts_as_its_text(tmp_path):
    """A date (Parquet's date32), also inside a struct: the task is built (it failed with "Object of type date is
    not JSON serializable"), and the target `distpg eval` shows is the date's text."""
    import datetime

    rows = [{"prompt": f"day {i}:", "reference": datetime.date(2024, 1, i + 1)} for i in range(8)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    t = prompts_task(tmp_path / "d.parquet", num_eval=2)
    assert t.target("day 0:") == "2024-01-01" and t.max_new_tokens == len("2024-01-01") + 1
    nested = [{"prompt": r["prompt"], "reference": {"on": r["reference"], "n": 1}} for r in rows]
    pq.write_table(pa.Table.from_pylist(nested), tmp_path / "s.parquet")
    assert prompts_task(tmp_path / "s.parquet", num_eval=2).target("day 7:") == '{"on": "2024-01-08", "n": 1}'


def test_uses_the_tokenizer_it_is_given(jsonl):
    bpe = byte_level_bpe([r["prompt"] + " " + r["reference"] for r in ROWS] * 5, vocab_size=300)
    t = prompts_task(jsonl, tokenizer=bpe)
    assert t.tokenizer is bpe
    assert t.max_prompt_len == max(len(bpe.encode(r["prompt"])) for r in ROWS) < len("say lynx:")  # in tokens
    assert t.max_new_tokens == max(len(bpe.encode(r["reference"])) for r in ROWS) + 1


def test_a_built_in_task_takes_the_policys_tokenizer():
    bpe = byte_level_bpe(["abcdef=" * 20], vocab_size=270)
    t = make_task(TaskConfig(name="reverse", length=4, alphabet="abcd", num_eval=8), bpe)
    assert t.tokenizer is bpe
    p = t.eval_prompts()[0]
    assert bpe.decode(t.tokenizer.encode(p)) == p


def test_a_tokenizer_that_cannot_encode_a_prompt_names_the_file_and_prompt(jsonl):
    """A character policy exported by distpg (a WordLevel tokenizer.json without [UNK]) as model.init_from for a
    file with other characters: an error naming the field and the prompt, not the tokenizers library's own."""
    from distpg.tokenizer import HFTokenizer

    chars = CharTokenizer("say :abcdefghijklmnopqrstuvw")  # no 'x' (in "fox" and "lynx")
    tok = HFTokenizer(chars.to_tokenizers(), chars.eos_id, chars.pad_id)
    with pytest.raises(ConfigError, match=r"task.prompts_path='.*p.jsonl': the policy's tokenizer cannot encode the "
                                          r"prompt 'say fox:' \(.*Missing \[UNK\] token.*\)"):
        prompts_task(jsonl, tok)


def test_without_references(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"tell me about {i}"} for i in range(10)])
    t = prompts_task(path, reward="tests.user_rewards:needs_reference", num_eval=2)
    assert t.max_new_tokens == 32 and t.target(t.eval_prompts()[0]) is None
    with pytest.raises(ValueError, match="no reference"):  # masked by distpg.rewards, not a crash
        t.reward(t.eval_prompts()[0], "x")


def test_duplicates_are_kept_once_unless_their_references_differ(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS + ROWS[:3])
    t = prompts_task(path)
    assert len(t.eval_prompts()) + len(set(t.sample_prompts(np.random.default_rng(0), 2000))) == len(ROWS)
    bad = write_jsonl(tmp_path / "bad.jsonl", ROWS + [{"prompt": "say ant:", "reference": "emmet"}])
    with pytest.raises(ConfigError, match=r"lines 1 and 13 have the same prompt 'say ant:' but different references"):
        prompts_task(bad)


def test_rewards_run_in_a_child_process(jsonl):
    # the default for a user's reward function (rollout.reward_isolation auto): the task survives a fork
    t = prompts_task(jsonl, reward="distpg.examples.rewards:match_reference")
    prompts = t.eval_prompts()
    completions = [" " + t.target(p) + " " for p in prompts[:2]] + ["zzzz", ""]
    got, ok, _, _ = rewards.score(t, prompts, completions, isolation="process", timeout_s=30)
    assert ok == [True] * 4
    assert got == [1.0, 1.0] + [match_reference(p, c, t.target(p)) for p, c in zip(prompts[2:], completions[2:])]


def test_match_reference_partial_credit():
    assert match_reference("", " lynx\n", "lynx") == 1.0
    assert match_reference("", "lynn", "lynx") == 0.75
    assert match_reference("", "lynxes", "lynx") == 4 / 6  # extra characters cost as much as missing ones
    with pytest.raises(ValueError, match="needs a reference"):
        match_reference("", "x", None)


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"prompts_path": None}, r"task.name=prompts needs task.prompts_path"),
        ({"prompts_path": "nope.jsonl"}, r"task.prompts_path='nope.jsonl': no such file"),
        ({"reward": None}, r"task.name=prompts needs task.reward: 'module:attr'"),
        ({"reward": "tests.user_rewards"}, r"task.reward='tests.user_rewards' is not of the form 'module:attr'"),
        ({"reward": "no.such.module:f"}, r"task.reward='no.such.module:f': cannot import module 'no.such.module'"),
        ({"reward": "tests.user_rewards:nope"}, r"module 'tests.user_rewards' has no attribute 'nope'"),
        ({"reward": "tests.user_broken_import:score"},
         r"task.reward='tests.user_broken_import:score': importing module 'tests.user_broken_import' raised "
         r"RuntimeError: REWARD_API_KEY is not set \(at .*user_broken_import.py:4\)"),
        ({"reward": "tests.user_exits:score"},  # ended distpg with status 3 and not a word
         r"task.reward='tests.user_exits:score': importing module 'tests.user_exits' raised SystemExit: 3 "
         r"\(at .*user_exits.py:6\)"),
        ({"reward": "tests.user_rewards:NOT_CALLABLE"}, r"'NOT_CALLABLE' is a int, not a function"),
        ({"reward": "tests.user_rewards:two_arguments"},
         r"two_arguments\(prompt, completion\) cannot be called as reward\(prompt, completion, reference\)"),
        ({"num_eval": 12}, r"has 12 distinct prompts, too few to hold out task.num_eval=12"),
    ],
)
def test_errors_name_the_field(jsonl, kw, message):
    kw = {"prompts_path": str(jsonl), **kw}
    with pytest.raises(ConfigError, match=message):
        prompts_task(kw.pop("prompts_path"), **kw)


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("p.csv", "prompt\nx\n", r"unknown file type '.csv'; allowed: .jsonl, .ndjson, .json \(JSON Lines, or one "
                                  r"array of objects\), .parquet"),
        ("p.jsonl", '{"prompt": "a"}\n{"prompt": \n', r"line 2 is not JSON"),
        ("p.jsonl", '{"prompt": "a"}\n\n{"question": "b"}\n', r"line 3: expected an object with a 'prompt' key"),
        ("p.jsonl", '{"prompt": ""}\n', r"line 1: 'prompt' must be non-empty text, got ''"),
        # blank lines count: the error names the line an editor shows
        ("p.jsonl", '{"prompt": "a"}\n\n{"prompt": 5}\n', r"line 3: 'prompt' must be non-empty text, got 5"),
        # TRL's conversational form: say how to write the text the model reads
        ("p.jsonl", '{"prompt": [{"role": "user", "content": "Hi"}]}\n',
         r"line 1: 'prompt' must be non-empty text, got \[\{'role': 'user', 'content': 'Hi'\}\]; a conversational "
         r"prompt .* tokenizer.apply_chat_template\(messages, tokenize=False, add_generation_prompt=True\)"),
        ("chat.parquet", None, r"row 1: 'prompt' must be non-empty text, got \[\{'role': 'user', 'content': 'Hi'\}\]; "
         r"a conversational prompt"),
        ("p.jsonl", '{"prompt": "a", "reference": 1}\n\n{"prompt": "a", "reference": 2}\n',
         r"lines 1 and 3 have the same prompt 'a' but different references"),
        ("p.jsonl", "\n", r"the file has no rows"),
        ("p.parquet", None, r"no 'prompt' column \(columns: question\)"),
        ("q.parquet", "not parquet", r"not a readable Parquet file"),
    ],
)
def test_file_errors_name_the_file_and_row(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None and name == "chat.parquet":
        pq.write_table(pa.table({"prompt": [[{"role": "user", "content": "Hi"}]]}), path)
    elif content is None:
        pq.write_table(pa.table({"question": ["a"]}), path)
    else:
        path.write_text(content)
    with pytest.raises(ConfigError, match=r"task.prompts_path='.*" + name + "'") as e:
        prompts_task(path)
    assert e.match(message)


def test_a_json_file_reads_as_json_lines_or_as_one_array(tmp_path):
    """datasets' `Dataset.to_json("train.json")` writes JSON Lines under a .json name (its default lines=True,
    records as `json.dumps` writes them, one a line); pandas' `to_json(orient="records")` writes one array.
    Both read as the same rows as the .jsonl file."""
    records = [{"prompt": "2 + 3 =", "answer": "5", "reference": None}, {"prompt": "1 + 1 =", "answer": "2"},
               {"prompt": "café ☕", "reference": "x"}]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    lines = tmp_path / "train.json"
    lines.write_bytes(jsonl.read_bytes())
    array = tmp_path / "records.json"
    array.write_text("\ufeff \n" + json.dumps(records, indent=2, ensure_ascii=False))  # a BOM, a pretty array
    expected = read_prompts(jsonl)
    assert expected == ([("2 + 3 =", None), ("1 + 1 =", None), ("café ☕", "x")], ["answer"])
    assert read_prompts(lines) == read_prompts(array) == expected
    assert prompts_task(array, num_eval=1).num_rows == 3


@pytest.mark.parametrize(
    "content,message",
    [
        ('[{"prompt": "a"}, {"question": "b"}]', r"item 2: expected an object with a 'prompt' key"),
        ('[{"prompt": "a"}, {"prompt": ""}]', r"item 2: 'prompt' must be non-empty text, got ''"),
        ('[{"prompt": "a"},', r"not JSON: "),
        ('{"prompt": "a"}\n[1]\n', r"line 2: expected an object with a 'prompt' key"),  # JSON Lines
    ],
)
def test_json_file_errors_name_the_item(tmp_path, content, message):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=r"task.prompts_path='.*p.json': " + message):
        prompts_task(path)


def test_a_jsonl_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "a"}\n{"prompt": "café"}\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"task.prompts_path='.*latin1.jsonl': line 2 is not UTF-8 text"):
        prompts_task(path)


def test_a_jsonl_file_opening_with_a_byte_order_mark_reads_as_without_one(tmp_path):
    """Windows editors save UTF-8 with a byte-order mark: the first line's prompt is the same text, and a mark
    anywhere else is still part of its line (here: JSON rejects it)."""
    rows = "".join(json.dumps(r) + "\n" for r in ROWS).encode("utf-8")
    plain, marked = tmp_path / "plain.jsonl", tmp_path / "marked.jsonl"
    plain.write_bytes(rows)
    marked.write_bytes(b"\xef\xbb\xbf" + rows)
    assert read_prompts(marked) == read_prompts(plain)
    (tmp_path / "late.jsonl").write_bytes(rows + b"\xef\xbb\xbf" + rows.splitlines(keepends=True)[0])
    with pytest.raises(ValueError, match=rf"line {len(ROWS) + 1} is not JSON"):
        read_prompts(tmp_path / "late.jsonl")


def test_a_folder_as_prompts_path_is_named_as_a_folder(tmp_path):
    """A dataset folder of Parquet shards (as the Hub holds them): the error says it is a folder, not missing."""
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "data" / "train-00000-of-00001.parquet")
    with pytest.raises(ConfigError, match=r"task.prompts_path='.*data': a folder, not a file; give one .jsonl, "
                                          r".ndjson or .parquet file \(it holds train-00000-of-00001.parquet\)"):
        prompts_task(tmp_path / "data")


def test_parquet_errors_name_the_row(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", None]}), path)
    with pytest.raises(ConfigError, match=r"row 2: 'prompt' must be non-empty text, got None"):
        prompts_task(path)


def test_max_prompt_tokens_leaves_out_the_longer_rows_and_the_error_suggests_it(tmp_path, capsys):
    from distpg.config import load_config
    from distpg.orchestrator import validate_with_task

    rows = ROWS + [{"prompt": "say " + "very " * 20 + "long:", "reference": "x"} for _ in range(1)] + \
        [{"prompt": "tell " + "much " * 12 + "more:", "reference": "y"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    t = prompts_task(path, max_prompt_tokens=20)
    assert t.dropped == 2 and t.num_rows == 14
    assert all(len(p) <= 20 for p in t.eval_prompts() + t._train) and len(t.eval_prompts() + t._train) == 12
    assert t.max_prompt_len == len("say lynx:")
    with pytest.raises(ConfigError, match=r"task.max_prompt_tokens=3: every prompt of .* is longer \(the shortest "
                                          r"has 8 tokens\)"):
        prompts_task(path, max_prompt_tokens=3)
    with pytest.raises(ConfigError, match="task.max_prompt_tokens=0: must be at least 1"):
        prompts_task(path, max_prompt_tokens=0)
    with pytest.raises(ConfigError, match="task.max_prompt_tokens is not used by task.name='reverse'"):
        make_task(TaskConfig(name="reverse", max_prompt_tokens=20))

    sets = [f"task.prompts_path={path}", "task.reward=tests.user_rewards:length_of_reference", "task.num_eval=4",
            "model.n_positions=32"]
    cfg = load_config(None, ["task.name=prompts", *sets])
    with pytest.raises(ConfigError, match=r"need 114 \(the longest: 'say very very .*'\); set "
                                          r"task.max_prompt_tokens=27 to leave out the longer prompts"):
        validate_with_task(cfg, make_task(cfg.task))
    cfg = load_config(None, ["task.name=prompts", *sets, "task.max_prompt_tokens=27"])
    validate_with_task(cfg, make_task(cfg.task))
    assert "task.max_prompt_tokens=27: left out 2 of 14 prompts, longer than that" in capsys.readouterr().out


def trl_dataset(tmp_path, suffix):
    """ROWS as a TRL dataset would hold them: the answer in a column `answer`, and an `id`."""
    rows = [{"prompt": r["prompt"], "answer": r["reference"], "id": i} for i, r in enumerate(ROWS)]
    path = tmp_path / f"p{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return rows, path


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_columns_other_than_prompt_and_reference_are_named_as_ignored(tmp_path, capsys, suffix):
    """A TRL dataset's `answer` column (TRL passes every column to the reward function) is not a reference:
    the run says so before it trains with reference=None, instead of scoring silently against None."""
    from distpg.config import load_config
    from distpg.orchestrator import validate_with_task

    rows, path = trl_dataset(tmp_path, suffix)
    cfg = load_config(None, ["task.name=prompts", f"task.prompts_path={path}", "task.num_eval=4",
                             "task.reward=tests.user_rewards:length_of_reference"])
    task = make_task(cfg.task)
    assert task.ignored_columns == ["answer", "id"]
    validate_with_task(cfg, task)
    out = capsys.readouterr().out
    assert (f"task.prompts_path={str(path)!r}: column(s) answer, id ignored: only 'prompt' and 'reference' are "
            "read, and no row has a 'reference' (the reward function gets reference=None) (a batched reward "
            "function, TRL's form with a 'completions' parameter, gets every column)") in out
    validate_with_task(cfg, prompts_task(write_jsonl(tmp_path / "q.jsonl", ROWS)))  # nothing to say
    assert "ignored" not in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize("isolation", ["none", "process"])
def test_a_trl_style_reward_function_gets_the_batch_and_every_column(tmp_path, suffix, isolation):
    """A function with a `completions` parameter is called as TRL calls it: prompts and completions as lists,
    each other column of the file as a keyword list aligned with them (so nothing is ignored)."""
    rows, path = trl_dataset(tmp_path, suffix)
    task = prompts_task(path, reward="tests.user_rewards:trl_style")
    assert task.ignored_columns == []
    picked = [rows[i] for i in (7, 2, 7, 11, 0)]  # repeats, out of file order
    completions = [r["answer"] if k % 2 == 0 else "nope" for k, r in enumerate(picked)]
    got, ok, _, _ = rewards.score(task, [r["prompt"] for r in picked], completions, isolation=isolation)
    assert got == [float(k % 2 == 0) + r["id"] / 100 for k, r in enumerate(picked)] and all(ok)
    # a per-sample function (prompt, completion, reference) on the same file gets no column but the reference
    assert prompts_task(path).ignored_columns == ["answer", "id"]


@pytest.mark.parametrize("isolation", ["none", "process"])
def test_an_async_reward_function_is_awaited_as_trl_awaits_one(tmp_path, isolation):
    """TRL's GRPOTrainer takes `async def` reward functions (it awaits them); one is awaited here too, batched or
    of one sample, instead of every sample failing with "'coroutine' object is not iterable" (or "returned
    <coroutine ...>")."""
    rows, path = trl_dataset(tmp_path, ".jsonl")
    prompts, completions = [r["prompt"] for r in rows[:4]], ["ant", "nope", "cat", "x"]
    got, ok, _, _ = rewards.score(prompts_task(path, reward="tests.user_rewards:trl_async"), prompts, completions,
                                  isolation=isolation)
    assert got == [1.0, 0.0, 1.0, 0.0] and all(ok)
    one = prompts_task(write_jsonl(tmp_path / "q.jsonl", ROWS), reward="tests.user_rewards:async_length_of_reference")
    got, ok, _, _ = rewards.score(one, prompts, completions, isolation=isolation)
    assert got == [1.0, 0.0, 1.0, 0.0] and all(ok)
    # an async function of one sample (an LLM judge's call each) is awaited for the whole batch at once: its calls
    # overlap, as TRL's judges' do, instead of one sample's call after another's
    from tests import user_rewards

    user_rewards.IN_FLIGHT.update(now=0, most=0)
    judge = prompts_task(tmp_path / "q.jsonl", reward="tests.user_rewards:async_judge")
    got, ok, _, _ = rewards.score(judge, prompts, completions, isolation=isolation)
    assert got == [4.0] * 4 and all(ok)
    # and several async functions are awaited together, as TRL runs them concurrently: both judges' calls for
    # the batch overlap (8 in flight; one function after the other: 4 each, so 8 instead of 16 in sum)
    user_rewards.IN_FLIGHT.update(now=0, most=0)
    judges = prompts_task(tmp_path / "q.jsonl", reward=["tests.user_rewards:async_judge",
                                                        "tests.user_rewards:async_judge_too"])
    got, ok, _, parts = rewards.score(judges, prompts, completions, isolation=isolation)
    assert got == [16.0] * 4 and all(ok) and parts == {"async_judge": [8.0] * 4, "async_judge_too": [8.0] * 4}


def test_a_parquet_column_only_a_batched_function_gets_is_read_only_for_one(tmp_path):
    """A column that Python cannot hold (a timestamp past the year 9999, a sentinel some exports write) stops
    neither a per-sample function's run, which never reads the column (nor its memory: a file's other columns
    may be large), nor, unnamed, a batched one's: the error names the file and the column."""
    rows = [{"prompt": r["prompt"], "answer": r["reference"]} for r in ROWS]
    table = pa.Table.from_pylist(rows).append_column("until", pa.array([10**15] * len(ROWS), pa.timestamp("ms")))
    pq.write_table(table, tmp_path / "p.parquet")
    assert prompts_task(tmp_path / "p.parquet").ignored_columns == ["answer", "until"]
    with pytest.raises(ConfigError, match=r"p.parquet': column 'until' \(timestamp\[ms\]\) has a value Python "
                                          "cannot hold: "):
        prompts_task(tmp_path / "p.parquet", reward="tests.user_rewards:trl_style")


def test_a_trl_style_functions_policy_can_write_the_answers_in_the_files_other_columns(tmp_path):
    """The README's TRL dataset, rows like {"prompt": "2 + 3 =", "answer": "5"}: with a batched function and no
    model.init_from the character tokenizer covers the answers' characters (text, and numbers as their JSON
    text), which no prompt holds, so the policy can write them; a per-sample function's stays that of the
    prompts and references."""
    rows = [{"prompt": f"{a} + {b} =", "answer": str(a + b), "sum": a + b + 10, "when": None, "tags": ["z"]}
            for a in (1, 2, 3) for b in (1, 2, 3)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    tok = prompts_task(path, reward="tests.user_rewards:trl_style", num_eval=2).tokenizer
    for r in rows:
        assert tok.decode(tok.encode(r["answer"] + str(r["sum"]))) == r["answer"] + str(r["sum"])
    assert "z" not in tok.stoi  # a list's contents are not text the policy writes
    assert set(prompts_task(path, num_eval=2).tokenizer.stoi) == {"<pad>", "<eos>", *"".join(r["prompt"] for r in rows)}


def test_a_trl_style_function_that_cannot_take_the_files_columns_says_to_add_kwargs(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": r["prompt"], "answer": r["reference"], "id": 1}
                                              for r in ROWS])
    with pytest.raises(ConfigError, match=r"trl_without_kwargs\(completions, answer\) takes a batch .* called as "
                                          r"trl_without_kwargs\(prompts=\[...\], completions=\[...\], "
                                          r"completion_ids=\[...\], answer=\[...\], id=\[...\]\) .* add \*\*kwargs"):
        prompts_task(path, reward="tests.user_rewards:trl_without_kwargs")


def test_a_trl_style_function_refused_for_a_column_clash_trls_own_arguments_or_a_missing_column_says_why(tmp_path):
    """Calls that would fail with a TypeError under a message asking for the **kwargs the function has: a
    column named `completions` (the call would pass it twice), a required `trainer_state` (TRL's trainer
    passes it; distpg does not), and a required column the file lacks. `completion_ids` is passed."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": r["prompt"], "answer": r["reference"], "completions": 1}
                                              for r in ROWS])
    with pytest.raises(ConfigError, match=r"the file has a column 'completions' too, which that call cannot also "
                                          "pass; rename the column"):
        prompts_task(path, reward="tests.user_rewards:trl_style")
    with pytest.raises(ConfigError, match=r"trl_with_trainer_state\(completions, trainer_state, \*\*kwargs\) takes "
                                          r"a batch .* without 'trainer_state', which it requires: TRL's GRPOTrainer "
                                          r"passes it, distpg passes the prompts, .* give the parameter a default"):
        prompts_task(write_jsonl(tmp_path / "q.jsonl", ROWS), reward="tests.user_rewards:trl_with_trainer_state")
    # recent TRL's log_metric too: not a column the file lacks ("the file has no column 'log_metric'")
    with pytest.raises(ConfigError, match=r"without 'log_metric', which it requires: TRL's GRPOTrainer passes it, "
                                          r"distpg passes the prompts, .* give the parameter a default"):
        prompts_task(tmp_path / "q.jsonl", reward="tests.user_rewards:trl_with_log_metric")
    with pytest.raises(ConfigError, match=r"the file has a column 'completion_ids' too"):
        prompts_task(write_jsonl(tmp_path / "i.jsonl", [{**r, "completion_ids": 1} for r in ROWS]),
                     reward="tests.user_rewards:trl_style")
    with pytest.raises(ConfigError, match=r"called as trl_style\(prompts=\[...\], completions=\[...\], "
                                          r"completion_ids=\[...\], reference=\[...\]\), without 'answer', which it "
                                          r"requires: the file has "
                                          r"no column 'answer'$"):  # a column of another file
        prompts_task(tmp_path / "q.jsonl", reward="tests.user_rewards:trl_style")


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_repeated_prompt_whose_other_columns_differ_is_refused_only_to_a_batched_function(tmp_path, suffix):
    """A batched function gets one row's columns for a prompt: a repeat of 'say ant:' with another answer would
    be scored against the first row's answer and the second silently dropped, so it is an error naming both
    rows and the column. A per-sample function never reads the column: the file is fine for it. Repeats that
    agree (a missing key reads as None, NaN as NaN) are kept once, as before."""
    rows = [{"prompt": r["prompt"], "answer": r["reference"], "id": i, "score": float("nan")}
            for i, r in enumerate(ROWS)]
    same = [{**rows[3], "score": float("nan")}]
    bad = [{**rows[0], "answer": "emmet"}]
    unit = "line" if suffix == ".jsonl" else "row"
    for name, extra in (("same", same), ("bad", bad)):
        path = tmp_path / f"{name}{suffix}"
        if suffix == ".jsonl":
            write_jsonl(path, rows + extra)
        else:
            pq.write_table(pa.Table.from_pylist(rows + extra), path)
        if name == "same":
            assert len(prompts_task(path, reward="tests.user_rewards:trl_style").columns) == len(ROWS)
            continue
        with pytest.raises(ConfigError, match=rf"{unit}s 1 and 13 have the same prompt 'say ant:' but different "
                                              r"'answer' values \('ant' and 'emmet'\), and a batched reward "
                                              "function gets one row's columns for a prompt; keep one of the rows"):
            prompts_task(path, reward="tests.user_rewards:trl_style")
        assert prompts_task(path).ignored_columns == ["answer", "id", "score"]


def test_a_run_refuses_a_prompts_file_changed_since_it_started(jsonl, tmp_path):
    # the held-out split and the character tokenizer come from the file: eval, export and --resume of a run
    # against an edited file would score held-in prompts or load weights for other token ids (a new character
    # made the vocabulary one larger: a size-mismatch traceback from load_state_dict)
    from distpg.config import load_config, load_run_config
    from distpg.orchestrator import prepare_run_dir

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config(None, ["task.name=prompts", f"task.prompts_path={jsonl}",
                             "task.reward=tests.user_rewards:length_of_reference", "task.num_eval=4"])
    prepare_run_dir(cfg, run_dir, resume=False)
    assert load_run_config(run_dir / "config.yaml") == cfg  # unchanged: read as it was
    write_jsonl(jsonl, ROWS + [{"prompt": "say yak!", "reference": "yak"}])
    for weights in (True, False):  # --resume; eval and export
        with pytest.raises(ConfigError, match=r"task.prompts_path='.*p.jsonl' has changed since the run started .*"
                                              r"put back the file the run started from"):
            load_run_config(run_dir / "config.yaml", weights=weights)
    write_jsonl(jsonl, ROWS)  # put back
    assert load_run_config(run_dir / "config.yaml") == cfg
