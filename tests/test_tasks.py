import numpy as np
import pytest

from distpg.config import ConfigError, TaskConfig
from distpg.rewards import RewardError, score
from distpg.tasks import make_task
from distpg.tasks.base import positional_reward
from distpg.tokenizer import CharTokenizer


def task(**kw):
    return make_task(TaskConfig(**kw))


def test_positional_reward_hand_cases():
    assert positional_reward("cba", "cba") == 1.0
    assert positional_reward("cbx", "cba") == pytest.approx(2 / 3)
    assert positional_reward("cb", "cba") == pytest.approx(2 / 3)  # a missing character counts as wrong
    assert positional_reward("cbaa", "cba") == pytest.approx(3 / 4)  # an extra one costs as much
    assert positional_reward("", "cba") == 0.0
    assert positional_reward("abc", "cba") == pytest.approx(1 / 3)  # only the middle matches


def test_reverse():
    t = task(name="reverse", length=4, alphabet="abcd")
    assert t.target("abcd=") == "dcba"
    assert t.reward("abcd=", "dcba") == 1.0
    assert t.reward("abcd=", "dcbb") == 0.75
    assert t.reward("abcd=", "abcd") == 0.0
    assert t.max_new_tokens == 4 and t.max_prompt_len == 5


def test_sort():
    t = task(name="sort", length=5, alphabet="abcde")
    assert t.target("ecadb=") == "abcde"
    assert t.target("bbaab=") == "aabbb"
    assert t.reward("bbaab=", "aabbb") == 1.0
    assert t.reward("bbaab=", "aabbc") == 0.8


def test_addition():
    t = task(name="addition", digits=2)
    assert t.target("07+34=") == "41"
    assert t.target("99+99=") == "198"
    assert t.reward("99+99=", "198") == 1.0
    assert t.reward("99+99=", "188") == pytest.approx(2 / 3)
    assert t.reward("07+34=", "411") == pytest.approx(2 / 3)  # extra digit costs
    assert t.max_new_tokens == 4  # up to 3 digits and <eos>
    rng = np.random.default_rng(0)
    for p in t.sample_prompts(rng, 50):
        a, b = p[:-1].split("+")
        assert len(a) == len(b) == 2 and p.endswith("=")


def test_prompts_are_drawn_from_the_alphabet_and_have_the_length():
    t = task(name="reverse", length=8, alphabet="abcdef")
    for p in t.sample_prompts(np.random.default_rng(1), 100):
        assert len(p) == 9 and set(p[:-1]) <= set("abcdef")


def test_held_out_prompts_are_fixed_distinct_and_never_trained_on():
    t = task(name="reverse", length=3, alphabet="abcd", num_eval=16)  # 64 prompts, 16 held out
    ev = t.eval_prompts()
    assert len(ev) == len(set(ev)) == 16
    assert ev == task(name="reverse", length=3, alphabet="abcd", num_eval=16).eval_prompts()
    train = set(t.sample_prompts(np.random.default_rng(0), 2000))
    assert not train & set(ev)
    assert len(train) == 64 - 16  # every other prompt does get drawn


def test_too_small_prompt_space_is_a_config_error():
    with pytest.raises(ConfigError, match=r"only 8 distinct prompts, too few to hold out task.num_eval=128 .* "
                                          r"a longer task.length or a larger task.alphabet\), "
                                          r"or lower task.num_eval \(at most 4 here\)"):
        task(name="reverse", length=3, alphabet="ab")
    assert len(task(name="reverse", length=3, alphabet="ab", num_eval=4).eval_prompts()) == 4  # the most allowed


def test_bad_task_parameters():
    with pytest.raises(ConfigError, match="task.length=0"):
        task(name="reverse", length=0)
    with pytest.raises(ConfigError, match="task.alphabet='a'"):
        task(name="sort", alphabet="a")
    with pytest.raises(ConfigError, match="task.digits=0"):
        task(name="addition", digits=0)


def test_user_task_from_module_attr():
    t = task(name="tests.user_task:make", params={"word": "ok"})
    assert t.name == "echo" and t.reward("x=", "ok") == 1.0 and t.reward("x=", "no") == 0.0


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("tests.no_such_module:make", "cannot import module 'tests.no_such_module'"),
        ("tests.user_task:nothing", "module 'tests.user_task' has no attribute 'nothing'"),
        ("tests.user_broken_import:make", "task.name='tests.user_broken_import:make': importing module "
                                          "'tests.user_broken_import' raised RuntimeError: REWARD_API_KEY is not set"),
        ("tests.user_task:broken_factory", "building the task failed: RuntimeError: boom"),
        ("tests.user_task:not_a_task", "lacks"),
    ],
)
def test_user_task_errors(name, fragment):
    with pytest.raises(ConfigError) as e:
        task(name=name)
    assert fragment in str(e.value)


def test_tokenizer_round_trip_and_errors():
    tok = CharTokenizer("cab=")
    ids = tok.encode("abc=")
    # ids 0, 1 are <pad>, <eos>; the charset follows in sorted order: '=' (61) < 'a' (97)
    assert ids == [3, 4, 5, 2] and tok.decode(ids) == "abc="
    assert tok.decode([3, 4, tok.eos_id, 5]) == "ab"  # stops at <eos>
    assert tok.decode([tok.pad_id, 3]) == "a"
    with pytest.raises(ValueError, match="character 'z' is not in the charset '=abc'"):
        tok.encode("az")


class Flaky:
    name = "flaky"

    def reward(self, prompt, completion):
        return {"nan": float("nan"), "raise": None, "str": "1", "inf": float("inf")}.get(completion, 0.5) \
            if completion != "raise" else 1 / 0


def test_score_masks_bad_rewards():
    rewards, ok, errors, _ = score(Flaky(), ["p"] * 5, ["good", "nan", "raise", "str", "inf"])
    assert ok == [True, False, False, False, False]
    assert rewards == [0.5, 0.0, 0.0, 0.0, 0.0]
    assert "ZeroDivisionError" in errors[1] and "returned nan" in errors[0]


def test_score_raises_when_every_reward_fails():
    with pytest.raises(RewardError, match="failed on all 2 samples.*ZeroDivisionError"):
        score(Flaky(), ["p", "q"], ["raise", "raise"])


@pytest.mark.parametrize("name, field, value", [
    ("reverse", "params", {"fault": "hang"}),
    ("sort", "reward", "tests.user_rewards:length_of_reference"),
    ("tests.user_task:make", "prompts_path", "configs/data/repeat_words.jsonl"),
])
def test_a_task_field_no_task_reads_is_refused(name, field, value):
    with pytest.raises(ConfigError, match=rf"task.{field} is not used by task.name='{name}'"):
        make_task(TaskConfig(name=name, **{field: value}))
