"""Tokenizers: a character tokenizer for the built-in tasks, and any Hugging Face tokenizer.json (GPT-2's
byte-level BPE among them) for real checkpoints, behind the same small interface (`Tokenizer`).

`CharTokenizer`: one id per character, plus <pad> (0) and <eos> (1). `HFTokenizer`: a `tokenizers.Tokenizer`
with the model's end-of-text id as eos (GPT-2: <|endoftext|>), and any other tokens its folder names as ends of
text (`stop_ids`). In both, eos (or any of `stop_ids`) ends a completion (the sampler stops a row on it), and
decoding stops at the first and drops special tokens.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

PAD, EOS = "<pad>", "<eos>"


def until_eos(ids: list[int], eos_id: int | Collection[int], pad_id: int | None = None) -> list[int]:
    """The ids before the first eos (`eos_id`: one id, or several that each end the text), without `pad_id`
    (None: keep every id)."""
    stops = {eos_id} if isinstance(eos_id, int) else set(eos_id)
    out = []
    for i in ids:
        if i in stops:
            break
        if i != pad_id:
            out.append(i)
    return out


def stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """The tokens that end a completion: `tokenizer.stop_ids` where it has them (eos first), else its eos."""
    return tuple(getattr(tokenizer, "stop_ids", None) or (tokenizer.eos_id,))


class Tokenizer(Protocol):
    """What the sampler, the rollout workers and the tasks need from a tokenizer (`stop_ids`, the tokens that
    end a completion where there are several, is optional: `stop_ids(tokenizer)`)."""

    pad_id: int  # left padding of prompts in a batch (masked out) and filler after a stopped row
    eos_id: int  # ends a completion (the one a completion is ended with where a task writes one)

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class CharTokenizer:
    """Maps each character of `charset` to an id; ids 0 and 1 are <pad> and <eos>."""

    pad_id = 0
    eos_id = 1

    def __init__(self, charset: str) -> None:
        chars = sorted(set(charset))
        if not chars:
            raise ValueError("tokenizer: charset is empty")
        self.itos = [PAD, EOS, *chars]
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            allowed = "".join(self.itos[2:])
            raise ValueError(f"tokenizer: character {e.args[0]!r} is not in the charset {allowed!r}") from None

    def decode(self, ids: list[int]) -> str:
        """Text of the ids, stopping at the first <eos> and skipping <pad>."""
        return "".join(self.itos[i] for i in until_eos(ids, self.eos_id, self.pad_id))

    def to_tokenizers(self) -> tokenizers.Tokenizer:
        """The same tokenizer as a `tokenizers.Tokenizer` (WordLevel, one token per character), so an exported
        policy's tokenizer.json opens with `tokenizers` and transformers and gives the same ids."""
        # "<unk>" is not in the vocabulary: an unknown character is an error, as in `encode`
        tok = tokenizers.Tokenizer(models.WordLevel(vocab=dict(self.stoi), unk_token="<unk>"))
        # every character is its own piece ([\s\S]: newlines too); decoding joins them without spaces
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        tok.add_special_tokens([PAD, EOS])
        return tok


class HFTokenizer:
    """A `tokenizers.Tokenizer` (e.g. from a checkpoint's tokenizer.json) with CharTokenizer's interface.

    Args:
        tokenizer: the tokenizer; `encode` applies its post-processor as `tokenizers` and transformers do.
        eos_id: end-of-text token (GPT-2: <|endoftext|>, 50256).
        pad_id: padding token; GPT-2 has none, so the default is eos_id (padding is always masked).
        more_eos: other tokens that also end a completion (a checkpoint's other end-of-text or end-of-turn
            tokens); `stop_ids` is eos_id, then these.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, eos_id: int, pad_id: int | None = None,
                 more_eos: Collection[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.pad_id = eos_id if pad_id is None else pad_id
        self.stop_ids = tuple(dict.fromkeys([eos_id, *more_eos]))
        for what, i in (("eos", self.eos_id), ("pad", self.pad_id), *(("end", i) for i in self.stop_ids)):
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"tokenizer: {what} id {i} is outside its vocabulary of {self.vocab_size}")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        """Text of the ids, stopping at the first of `stop_ids` and skipping special tokens. The padding id is
        not skipped as such: a completion holds none (`Generation.rows` ends each at its length), and a
        config's `pad_token_id` may be an ordinary token the policy generates."""
        return self.tokenizer.decode(until_eos(ids, self.stop_ids), skip_special_tokens=True)

    def to_tokenizers(self) -> tokenizers.Tokenizer:
        return self.tokenizer
