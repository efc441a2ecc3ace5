"""Character tokenizer for the built-in tasks: one id per character, plus <pad> (0) and <eos> (1).

`<eos>` ends a completion; the sampler stops a row on it. Decoding drops both special tokens.
"""

from __future__ import annotations

PAD, EOS = "<pad>", "<eos>"


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
        out = []
        for i in ids:
            if i == self.eos_id:
                break
            if i != self.pad_id:
                out.append(self.itos[i])
        return "".join(out)
