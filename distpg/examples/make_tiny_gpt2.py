"""Make a small random GPT-2 folder, to try `model.init_from` without downloading a checkpoint.

    python -m distpg.examples.make_tiny_gpt2 OUT [--prompts FILE] [--vocab-size 512] [--preset tiny]

It trains a GPT-2-style byte-level BPE tokenizer (with <|endoftext|> as end of text) on the prompts file with
the `tokenizers` library, builds a fresh distpg policy with that vocabulary, and writes both with
`distpg.hf.export_gpt2`: config.json, model.safetensors and tokenizer.json, the layout of a real GPT-2 folder
(it opens with transformers), at a size that trains in seconds on a CPU. For GPT-2's own weights, point
`model.init_from` at a folder you downloaded (e.g. `hf download openai-community/gpt2 --local-dir gpt2`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from distpg.cliargs import number
from distpg.hf import export_gpt2, read_shape
from distpg.model import PRESETS, ModelShape, build_model
from distpg.tasks.prompts import read_prompts
from distpg.tokenizer import HFTokenizer

EOT = "<|endoftext|>"


def byte_level_bpe(texts: list[str], vocab_size: int) -> HFTokenizer:
    """A GPT-2-style tokenizer trained on `texts`: byte-level BPE (every string encodes, nothing is
    unknown), no prefix space, <|endoftext|> as eos and pad. It may have fewer than `vocab_size` tokens when
    the texts offer fewer merges."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return HFTokenizer(tok, eos_id=tok.token_to_id(EOT))


def make_tiny_gpt2(out: str | Path, texts: list[str], vocab_size: int = 512, preset: str = "tiny",
                   n_positions: int = 128, seed: int = 0) -> Path:
    """Write a random GPT-2 folder whose tokenizer is trained on `texts`. Returns the folder."""
    tokenizer = byte_level_bpe(texts, vocab_size)
    shape = ModelShape(vocab_size=tokenizer.vocab_size, n_positions=n_positions, **PRESETS[preset])
    return export_gpt2(build_model(shape, seed), tokenizer, out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m distpg.examples.make_tiny_gpt2", description=__doc__.split("\n")[0])
    p.add_argument("out", help="folder to write")
    p.add_argument("--prompts", default="configs/data/repeat_words.jsonl",
                   help="JSONL or Parquet prompts file whose text (prompts and references) trains the tokenizer "
                   "(default: the repository's, relative to its root)")
    p.add_argument("--vocab-size", type=number(int, 257), default=512, help="at least the 256 bytes + end of text")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS))
    p.add_argument("--n-positions", type=number(int, 1), default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        rows, _ = read_prompts(args.prompts)
    except ValueError as e:
        p.error(f"--prompts: {e}".replace("task.prompts_path=", "") +
                ("; the default is the repository's file: run from its root, or give --prompts FILE"
                 if args.prompts == p.get_default("prompts") else ""))
    texts = [t for prompt, ref in rows for t in (prompt, ref) if isinstance(t, str)]
    out = make_tiny_gpt2(args.out, texts, args.vocab_size, args.preset, args.n_positions, args.seed)
    print(f"wrote {out} ({', '.join(sorted(f.name for f in out.iterdir()))}): a random GPT-2 {args.preset} with a "
          f"{read_shape(out).vocab_size}-token byte-level BPE")


if __name__ == "__main__":
    main()
