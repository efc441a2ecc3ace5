"""Hugging Face GPT-2 folders: load one into distpg's policy and tokenizer, export a distpg policy as one.

A folder holds what `GPT2LMHeadModel.save_pretrained` and a tokenizer's `save_pretrained` write, and what the
GPT-2 repositories on the Hub hold: `config.json`, `model.safetensors` (or the shards that
`save_pretrained(max_shard_size=...)` writes, listed by `model.safetensors.index.json`) and `tokenizer.json`. Only the
`safetensors` and `tokenizers` libraries are used, not transformers, and nothing is downloaded: the folder is
local (fetch a Hub model yourself, e.g. `hf download openai-community/gpt2 --local-dir gpt2`).

Names: distpg's modules are GPT2LMHeadModel's without the `transformer.` prefix (`wte`, `h.N.attn.c_attn`,
...). HF's `Conv1D` stores its weight as (in, out), the transpose of `nn.Linear`'s (out, in). Both tie the
output layer to `wte`, so `lm_head.weight` is not stored, or must equal `wte.weight` when it is. Older
checkpoints (the Hub's `gpt2`) also store each layer's causal mask as `h.N.attn.bias`; it is skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import tokenizers
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from distpg.checkpoint import same_mode_as
from distpg.config import file_sha256
from distpg.model import GPT, ModelShape
from distpg.tokenizer import HFTokenizer, Tokenizer, stop_ids

FILES = ("config.json", "model.safetensors", "tokenizer.json")
INDEX = "model.safetensors.index.json"  # a sharded checkpoint's map of tensor names to its files, in place of one
# HF's Conv1D layers: weight stored (in, out)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")  # config.json's names of a GPT-2 whose weights are all distpg's
_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of old checkpoints, not parameters


def not_a_folder(folder: Path) -> str:
    """Why `folder` is no model folder: where a relative path was looked for, and for a name like a Hugging Face
    Hub id ('gpt2', 'org/name') that nothing is downloaded."""
    said = f"{str(folder)!r} is {'a file, not a folder' if folder.exists() else 'not a folder'}"
    if not folder.is_absolute():
        said += f" (looked for from the current folder, {os.getcwd()})"
    if not folder.exists() and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(folder)):
        said += ("; distpg reads a local folder and downloads nothing: save the model there first (transformers' "
                 "save_pretrained, where the Hub is reachable), or make a tiny one with python -m "
                 "distpg.examples.make_tiny_gpt2 DIR")
    return said


def read_config(folder: str | Path) -> dict:
    """config.json of a GPT-2 folder, checked for what distpg's GPT can represent. Raises ValueError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(not_a_folder(folder))
    # a run's copy has no weights; a sharded checkpoint has them in the files its index names
    needed = [f for f in FILES if f != "model.safetensors" or not (is_snapshot(folder) or (folder / INDEX).is_file())]
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        if (folder / "config.yaml").is_file() and (folder / "checkpoints").is_dir():  # a distpg run folder
            raise ValueError(f"{str(folder)!r} is a distpg run folder, not a GPT-2 folder: write its policy as one "
                             f"with distpg export {folder} OUT_DIR, then start from OUT_DIR")
        raise ValueError(f"{str(folder)!r} lacks {', '.join(missing)} (a GPT-2 folder holds {', '.join(FILES)}; "
                         f"a sharded one {INDEX} and its files in place of model.safetensors)"
                         + "".join(_conversion_hint(folder, f) for f in missing))
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(folder / 'config.json')!r} is not readable JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{str(folder / 'config.json')!r}: expected a JSON object")
    unsupported = {
        "model_type": (cfg.get("model_type", "gpt2"), "gpt2"),
        "activation_function": (cfg.get("activation_function", "gelu_new"), ("gelu_new", "gelu_pytorch_tanh")),
        "scale_attn_weights": (cfg.get("scale_attn_weights", True), True),
        "scale_attn_by_inverse_layer_idx": (cfg.get("scale_attn_by_inverse_layer_idx", False), False),
        "add_cross_attention": (cfg.get("add_cross_attention", False), False),
        "tie_word_embeddings": (cfg.get("tie_word_embeddings", True), True),
    }
    for key, (value, allowed) in unsupported.items():
        if value not in (allowed if isinstance(allowed, tuple) else (allowed,)):
            raise ValueError(f"{str(folder / 'config.json')!r}: {key}={value!r} is not GPT-2 as distpg implements it "
                             f"(allowed: {allowed!r})")
    architectures = cfg.get("architectures") or []  # absent from old configs
    if not isinstance(architectures, list) or not set(architectures) <= set(ARCHITECTURES):
        raise ValueError(f"{str(folder / 'config.json')!r}: architectures={architectures!r} is not a GPT-2 language "
                         f"model (allowed: {', '.join(ARCHITECTURES)}); a reward model or classifier cannot be the "
                         "policy")
    for key in ("vocab_size", "n_layer", "n_head", "n_embd", "n_positions"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise ValueError(f"{str(folder / 'config.json')!r}: {key}={cfg.get(key)!r}, expected a positive integer")
    if cfg.get("n_inner") not in (None, 4 * cfg["n_embd"]):
        raise ValueError(f"{str(folder / 'config.json')!r}: n_inner={cfg['n_inner']} but distpg's MLP is 4 x n_embd")
    return cfg


def _conversion_hint(folder: Path, missing: str) -> str:
    """How to write a missing file from what the folder holds instead, as transformers saves it ("" if nothing)."""
    resave = f"AutoModelForCausalLM.from_pretrained({str(folder)!r}).save_pretrained({str(folder)!r}"
    for bin in ("pytorch_model.bin", "pytorch_model.bin.index.json"):
        if missing == "model.safetensors" and (folder / bin).is_file():
            return (f"; it holds {bin} and distpg reads only safetensors: write model.safetensors with {resave})")
    if missing == "tokenizer.json" and (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return (f"; it holds vocab.json and merges.txt (a slow tokenizer's files): write tokenizer.json with "
                f"AutoTokenizer.from_pretrained({str(folder)!r}).save_pretrained({str(folder)!r})")
    return ""


def weight_files(folder: str | Path) -> dict[str, Path]:
    """Each tensor name of a GPT-2 folder's weights -> the safetensors file that holds it: model.safetensors,
    or, for a sharded checkpoint (no model.safetensors), the files that model.safetensors.index.json maps the
    names to (transformers too prefers the single file when both are there). Only the files' headers are read.
    Raises ValueError."""
    folder = Path(folder)
    files = [folder / "model.safetensors"]
    mapped = None
    if not files[0].is_file():
        index = folder / INDEX
        try:
            mapped = json.loads(index.read_text())["weight_map"]
            if not isinstance(mapped, dict) or not mapped or not all(isinstance(v, str) for v in mapped.values()):
                raise ValueError("weight_map is not an object of tensor names to file names")
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{str(index)!r} is not a sharded checkpoint's index (a JSON object whose "
                             f"weight_map maps tensor names to files): {e!r}") from None
        files = [folder / name for name in sorted(set(mapped.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ValueError(f"{str(index)!r} names {len(absent)} file(s) the folder lacks: {', '.join(absent[:4])}"
                             f"{' ...' if len(absent) > 4 else ''}")
    where: dict[str, Path] = {}
    for path in files:
        try:
            with safe_open(str(path), "pt") as f:
                names = list(f.keys())
        except Exception as e:  # safetensors raises its own error types for a corrupt header
            raise ValueError(f"{str(path)!r} is not a readable safetensors file: {e}") from None
        for name in names:
            if name in where:
                raise ValueError(f"{name!r} is stored twice, in {where[name].name} and {path.name}")
            where[name] = path
    if mapped is not None:
        wrong = sorted(n for n in mapped.keys() | where.keys() if n not in where or mapped.get(n) != where[n].name)
        if wrong:
            raise ValueError(f"{str(folder / INDEX)!r} does not match its files: {', '.join(wrong[:4])}"
                             f"{' ...' if len(wrong) > 4 else ''} not where its weight_map says")
    return where


def load_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GPT-2 folder's weights (see `weight_files`), as stored. Raises ValueError."""
    state = {}
    for path in sorted(set(weight_files(folder).values())):
        state.update(load_file(str(path)))
    return state


def read_shape(folder: str | Path) -> ModelShape:
    """The architecture of a GPT-2 folder (config.json), with every tensor of its weights (model.safetensors,
    or the shards of a sharded checkpoint) checked against it from the files' headers, and a stored
    `lm_head.weight` checked equal to `wte.weight` (the only weights read). Raises ValueError."""
    cfg = read_config(folder)
    shape = ModelShape(
        vocab_size=cfg["vocab_size"],
        n_layer=cfg["n_layer"],
        n_head=cfg["n_head"],
        n_embd=cfg["n_embd"],
        n_positions=cfg["n_positions"],
        layer_norm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-5)),
    )
    if is_snapshot(folder):  # no weights to check: a run's checkpoint holds them
        return shape
    where = weight_files(folder)
    stored = {}
    for path in sorted(set(where.values())):
        with safe_open(str(path), "pt") as f:
            stored.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
    path = next(iter(where.values())) if len(set(where.values())) == 1 else Path(folder) / INDEX
    expected = {name: tuple(_hf_layout(name, p.shape)) for name, p in _meta_model(shape).state_dict().items()}
    got = {}
    for name, size in stored.items():
        name = name.removeprefix("transformer.")
        if name == "lm_head.weight" or name.endswith(_MASK_BUFFERS):
            continue
        got[name] = size
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = sorted(n for n in set(expected) & set(got) if expected[n] != got[n])
    if missing or extra or wrong:
        parts = [f"{what}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                 for what, names in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)) if names]
        raise ValueError(f"{str(path)!r} does not match its config.json ({'; '.join(parts)})")
    heads = [name for name in stored if name.removeprefix("transformer.") == "lm_head.weight"]
    if heads:  # an explicit output layer must be the tied one: read the two matrices now, not in every actor
        wte = next(name for name in stored if name.removeprefix("transformer.") == "wte.weight")
        with safe_open(str(where[heads[0]]), "pt") as f, safe_open(str(where[wte]), "pt") as g:
            if stored[heads[0]] != stored[wte] or not torch.equal(f.get_tensor(heads[0]), g.get_tensor(wte)):
                raise ValueError(f"{str(path)!r}: lm_head.weight differs from wte.weight: distpg's GPT ties the "
                                 "output layer to wte")
    return shape


BASE = "base"  # in a run folder: what the run needs of its model.init_from folder besides the weights
FINGERPRINT = "fingerprint.json"  # in BASE: the sha256 of every file of the init_from folder
# weights, in any of the forms a Hub repository holds them (the openai-community/gpt2 download also has
# rust_model.ot, 64*.tflite, an onnx/ folder), and the index of a sharded checkpoint's files
# (model.safetensors.index.json): not copied into BASE, so never exported either: they are the initial
# policy's, not the trained one's (and an index beside an export's single model.safetensors would name shards it
# lacks)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".index.json", ".ot",
                   ".tflite", ".onnx", ".onnx_data", ".gguf", ".mlmodel", ".npz", ".pb")


# of the init_from folder's files that a run keeps (BASE), those that `distpg export` does not copy into its
# folder: distpg writes the model's config and the tokenizer itself, and the run's sampling settings are not
# those of a generation_config.json (see README); the rest (tokenizer_config.json with its special tokens and
# class, a chat template, vocab.json/merges.txt) is the checkpoint's tokenizer, which training does not change
NOT_EXPORTED = ("config.json", "tokenizer.json", "generation_config.json", FINGERPRINT)


def _is_weights(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file())


def snapshot_base(init_from: str | Path, run_dir: Path) -> None:
    """Keep in RUN_DIR/base what a new run started from `init_from` (a GPT-2 folder) needs to be read
    without it (config.json, the tokenizer files: every file but the weights), and the sha256 of all its
    files, so that a later --resume, eval or export can tell whether the folder changed since."""
    dest, tmp = run_dir / BASE, run_dir / f".{BASE}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    sums = {}
    for f in _files(Path(init_from)):
        sums[f.name] = file_sha256(f)
        if not _is_weights(f.name):
            shutil.copy2(f, tmp / f.name)
    (tmp / FINGERPRINT).write_text(json.dumps(sums, indent=1) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def base_changes(init_from: str | Path, run_dir: Path, weights: bool) -> list[str]:
    """The files of `init_from` that differ from those the run in `run_dir` started from, each as 'NAME
    (added)', 'NAME (removed)' or 'NAME (changed)'; only those that are not weights unless `weights`. [] for a
    run without a snapshot."""
    path = run_dir / BASE / FINGERPRINT
    if not path.exists():
        return []
    then = {k: v for k, v in json.loads(path.read_text()).items() if weights or not _is_weights(k)}
    now = {f.name: f for f in _files(Path(init_from)) if weights or not _is_weights(f.name)}
    return [f"{n} ({'added' if n not in then else 'removed' if n not in now else 'changed'})"
            for n in sorted(then.keys() | now.keys())
            if n not in then or n not in now or file_sha256(now[n]) != then[n]]


def is_snapshot(folder: str | Path) -> bool:
    """A run folder's BASE: the init_from folder's config and tokenizer without its weights."""
    return (Path(folder) / FINGERPRINT).exists() and not (Path(folder) / "model.safetensors").exists()


def _meta_model(shape: ModelShape) -> GPT:
    with torch.device("meta"):
        return GPT(shape)


def _hf_layout(name: str, size: torch.Size) -> torch.Size:
    return size[::-1] if name.endswith(CONV1D) else size


def from_hf_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A GPT2LMHeadModel (or GPT2Model) state dict in distpg's names and layout.

    Raises:
        ValueError if `lm_head.weight` is stored and differs from `wte.weight` (an untied output layer).
    """
    out = {}
    for name, w in state.items():
        name = name.removeprefix("transformer.")
        if name.endswith(_MASK_BUFFERS) or name == "lm_head.weight":
            continue
        out[name] = w.t().contiguous() if name.endswith(CONV1D) else w
    head = state.get("lm_head.weight")
    if head is not None and "wte.weight" in out and not torch.equal(head, out["wte.weight"]):
        raise ValueError("lm_head.weight differs from wte.weight: distpg's GPT ties the output layer to wte")
    return out


def to_hf_state(model: GPT) -> dict[str, torch.Tensor]:
    """distpg's parameters in GPT2LMHeadModel's names and layout (lm_head left out: it is tied to wte)."""
    return {
        "transformer." + name: (w.t() if name.endswith(CONV1D) else w).detach().contiguous()
        for name, w in model.state_dict().items()
    }


def load_gpt2(folder: str | Path) -> GPT:
    """The policy stored in a GPT-2 folder, on the CPU, float32, in eval mode. Raises ValueError."""
    shape = read_shape(folder)
    model = _meta_model(shape).to_empty(device="cpu")
    state = from_hf_state(load_weights(folder))
    model.load_state_dict(state, strict=True)  # strict: every parameter comes from the file
    return model.float().eval()


def load_tokenizer(folder: str | Path) -> HFTokenizer:
    """tokenizer.json of a GPT-2 folder, with eos and pad from config.json's eos_token_id and pad_token_id;
    eos defaults to the <|endoftext|> token, pad to tokenizer_config.json's pad_token (a pad token added with
    transformers: `tokenizer.pad_token_id`), else to eos. Every token the folder names as an end of text
    (`end_tokens`) ends a completion. Raises ValueError."""
    cfg = read_config(folder)
    path = Path(folder) / "tokenizer.json"
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise ValueError(f"{str(path)!r} is not a tokenizer.json the tokenizers library reads: {e}") from None
    eos_id = _eos_id(cfg, tok)
    if eos_id is None:
        raise ValueError(f"{str(folder)!r}: config.json has no eos_token_id and tokenizer.json no <|endoftext|>"
                         + _tokenizer_eos_hint(folder, tok))
    n = tok.get_vocab_size(with_added_tokens=True)
    for key, i in (("eos_token_id", eos_id), ("pad_token_id", cfg.get("pad_token_id"))):
        # GPT2Config() defaults both bos and eos to GPT-2's 50256, whatever vocab_size it is given
        if isinstance(i, int) and not 0 <= i < n:
            raise ValueError(
                f"{str(Path(folder) / 'config.json')!r}: {key}={i} is outside the vocabulary of tokenizer.json "
                f"({n} tokens); set it to your tokenizer's end-of-text id{_tokenizer_eos_hint(folder, tok)}, e.g. "
                + ("GPT2Config(..., bos_token_id=ID, eos_token_id=ID) before save_pretrained" if key != "pad_token_id"
                   else "GPT2Config(..., pad_token_id=ID) before save_pretrained, or leave pad_token_id out (pad "
                        "then defaults to eos)"))
    pad_id = cfg.get("pad_token_id")
    if pad_id is None:
        said = _tokenizer_config_token(folder, tok, "pad_token")
        pad_id = None if said is None else said[1]
    ends = end_tokens(folder, cfg, tok)
    for i, where in ends.items():
        if not 0 <= i < n:
            raise ValueError(f"{str(folder)!r}: {where[0]} lists {i}, outside the vocabulary of tokenizer.json "
                             f"({n} tokens); remove it or set it to a token of your tokenizer")
    try:
        tokenizer = HFTokenizer(tok, eos_id, pad_id, more_eos=list(ends)[1:])
    except ValueError as e:  # eos or pad outside the vocabulary
        raise ValueError(f"{str(folder)!r}: {e}") from None
    if tokenizer.vocab_size > cfg["vocab_size"]:
        raise ValueError(f"{str(path)!r} has {tokenizer.vocab_size} tokens but the model only {cfg['vocab_size']} "
                         "(config.json vocab_size): tokens added to the tokenizer (a pad token) need rows in the "
                         "model too, model.resize_token_embeddings(len(tokenizer)) before save_pretrained")
    return tokenizer


def _eos_id(cfg: dict, tok: tokenizers.Tokenizer) -> int | None:
    """The token that ends a completion: config.json's eos_token_id (the first where it lists several), else
    <|endoftext|>; None if neither."""
    eos_id = cfg.get("eos_token_id")
    if isinstance(eos_id, list):  # some configs list several end tokens: the first is the one to emit
        eos_id = eos_id[0] if eos_id else None
    return tok.token_to_id("<|endoftext|>") if eos_id is None else eos_id


def _ids(value) -> list[int]:
    """An eos_token_id field (an id, a list of them, or absent) as a list of ids."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    return [i for i in value if isinstance(i, int) and not isinstance(i, bool)] if isinstance(value, list) else []


def _tokenizer_config_token(folder: Path, tok: tokenizers.Tokenizer,
                            key: str = "eos_token") -> tuple[str, int | None] | None:
    """tokenizer_config.json's eos_token (what transformers' and TRL's `tokenizer.eos_token_id` is), or another
    special token (`key`: pad_token), and its id in tokenizer.json; None where the file or the field is absent
    or unreadable."""
    try:
        token = json.loads((Path(folder) / "tokenizer_config.json").read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(token, dict):  # an AddedToken as older transformers saved it
        token = token.get("content")
    return (token, tok.token_to_id(token)) if isinstance(token, str) and token else None


def _tokenizer_eos_hint(folder: Path, tok: tokenizers.Tokenizer) -> str:
    endoftext = tok.token_to_id("<|endoftext|>")
    said = _tokenizer_config_token(folder, tok)
    if said is not None and said[1] is not None and said[1] != endoftext:
        return f" (tokenizer_config.json's eos_token {said[0]!r} is {said[1]})"
    return f" (<|endoftext|> is {endoftext})" if endoftext is not None else ""


def end_tokens(folder: str | Path, cfg: dict | None = None,
               tok: tokenizers.Tokenizer | None = None) -> dict[int, list[str]]:
    """The tokens that end a completion from a GPT-2 folder, each with the files that name it, in order:
    config.json's eos_token_id (`load_tokenizer`'s eos; every id where it lists several), then the ids
    generation_config.json's eos_token_id lists (transformers' `generate` stops at each), then
    tokenizer_config.json's eos_token (where TRL ends and masks a completion) where tokenizer.json has it.
    {} where there is no eos at all (`load_tokenizer` says so)."""
    folder = Path(folder)
    cfg = read_config(folder) if cfg is None else cfg
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")) if tok is None else tok
    eos_id = _eos_id(cfg, tok)
    if eos_id is None:
        return {}
    listed = _ids(cfg.get("eos_token_id"))
    found: dict[int, list[str]] = {eos_id: ["config.json's eos_token_id" if listed else "<|endoftext|>"]}
    for i in listed[1:]:
        found.setdefault(i, []).append("config.json's eos_token_id")
    try:
        listed = _ids(json.loads((folder / "generation_config.json").read_text()).get("eos_token_id"))
    except (OSError, ValueError, AttributeError):
        listed = []
    for i in listed:
        found.setdefault(i, []).append("generation_config.json's eos_token_id")
    said = _tokenizer_config_token(folder, tok)
    if said is not None and said[1] is not None:
        found.setdefault(said[1], []).append("tokenizer_config.json's eos_token")
    return found


def end_tokens_note(folder: str | Path) -> str | None:
    """What `distpg train` says where a folder names more than one token that ends a completion (`end_tokens`);
    None where it names one."""
    tok = tokenizers.Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    found = end_tokens(folder, tok=tok)
    if len(found) < 2:
        return None
    return (f"model.init_from={str(folder)!r}: a completion ends at any of "
            + "; ".join(f"{i} ({tok.id_to_token(i)!r}, {' and '.join(dict.fromkeys(where))})"
                        for i, where in found.items()))


def export_gpt2(model: GPT, tokenizer: Tokenizer, folder: str | Path, extra_files: list[Path] = ()) -> Path:
    """Write `model` and `tokenizer` as a GPT-2 folder that transformers opens
    (`AutoModelForCausalLM.from_pretrained(folder)`, `AutoTokenizer.from_pretrained(folder)`) and that
    `model.init_from` loads back. A character tokenizer is written as an equivalent WordLevel tokenizer.json
    (one token per character). `extra_files` are copied in last, in place of a file of the same name
    (a checkpoint's own tokenizer_config.json, chat template, ...). Returns the folder."""
    folder = Path(folder)
    # written whole into a temporary sibling, then moved into place: an interrupted export leaves no half folder
    tmp = folder.parent / f".{folder.name}.export-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_gpt2(model, tokenizer, tmp)
        for f in extra_files:
            if f.name == "tokenizer_config.json":  # theirs, with the padding token the export's config.json names
                ours, theirs = json.loads((tmp / f.name).read_text()), json.loads(f.read_text())
                if theirs.get("pad_token") is None:  # GPT-2's has none: the export's is its eos, as config.json says
                    theirs["pad_token"] = ours["pad_token"]
                (tmp / f.name).write_text(json.dumps(theirs, indent=2) + "\n")
            else:
                shutil.copy2(f, tmp / f.name)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        if folder.exists():  # a folder with files (the library call; `distpg export` refuses one): replace them
            for f in tmp.iterdir():
                f.replace(folder / f.name)
            tmp.rmdir()
        else:
            tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _write_gpt2(model: GPT, tokenizer: Tokenizer, folder: Path) -> None:
    """export_gpt2's files, written into `folder`."""
    s = model.shape
    hf_tok = tokenizer.to_tokenizers()
    eos, pad = hf_tok.id_to_token(tokenizer.eos_id), hf_tok.id_to_token(tokenizer.pad_id)
    ends = stop_ids(tokenizer)
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": s.vocab_size,
        "n_positions": s.n_positions,
        "n_embd": s.n_embd,
        "n_layer": s.n_layer,
        "n_head": s.n_head,
        "n_inner": None,
        "layer_norm_epsilon": s.layer_norm_epsilon,
        "activation_function": "gelu_new",
        # distpg trains without dropout; these keep transformers' fine-tuning the same model
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.eos_id,  # GPT-2's convention: <|endoftext|> starts and ends a text
        # every token that ends a completion (a list where there are several: transformers stops at each)
        "eos_token_id": list(ends) if len(ends) > 1 else tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "dtype": str(model.wte.weight.dtype).removeprefix("torch."),
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eos,
        "eos_token": eos,
        "pad_token": pad,
        "model_max_length": s.n_positions,
        "clean_up_tokenization_spaces": False,
    }
    save_file(to_hf_state(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    same_mode_as(folder / "model.safetensors", folder / "config.json")
    hf_tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def export_policy(path: str | Path, out: str | Path) -> Path:
    """`distpg export`: the policy of a run folder (its latest checkpoint) or a checkpoint folder, with its
    tokenizer, as a GPT-2 folder at `out`."""
    from distpg.evaluate import load_policy, resolve_checkpoint
    from distpg.policy import task_for

    cfg, model = load_policy(Path(path))
    base = resolve_checkpoint(Path(path))[0] / BASE  # a run started from a GPT-2 folder: its files but weights
    # (a run from before WEIGHT_SUFFIXES named every form of weights may hold some in BASE: not exported either)
    kept = [f for f in _files(base) if f.name not in NOT_EXPORTED and not _is_weights(f.name)] if base.is_dir() else []
    return export_gpt2(model, task_for(cfg).tokenizer, out, kept)
