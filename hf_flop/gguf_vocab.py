"""A tokenizer as llama.cpp reads it: the ``tokenizer.*`` metadata of a GGUF file.

Two sources, tried in this order by ``vocabulary``:

* **a GGUF file** (``tokenizer_gguf``): its ``tokenizer.*`` entries are copied as they are. This is
  the right source for a model whose weights came from a GGUF file (the embedded SmolLM2,
  ``hf_flop.app.data.smollm2_gguf()``): llama.cpp's own converter wrote that vocabulary, including the
  pre-tokenizer name, which transformers' GGUF loader does not carry over into ``tokenizer.json``;
* **a transformers fast tokenizer** (its ``tokenizer.json``), when it is a byte-level BPE (GPT-2
  style; ``tokenizer.ggml.model = "gpt2"``) whose pre-tokenizer is one of ``PRE_TOKENIZERS``. llama.cpp
  does not run the pre-tokenizer described in ``tokenizer.json``: it picks a built-in set of regexes
  by name (``tokenizer.ggml.pre``, src/llama-vocab.cpp) and throws on a name it does not know. The
  table maps the ``tokenizer.json`` pre-tokenizers whose splitting equals one of those built-in sets to
  its name; a tokenizer with any other pre-tokenizer is refused, not given a name that would split
  text differently. ``tokenizer_pre`` names it explicitly for a tokenizer known to match.

Refused, with the remedy in the message: SentencePiece-style tokenizers (byte fallback, Unigram,
WordPiece), non-special added tokens (llama.cpp stores those in a pre-tokenized form this module does
not build), duplicate token strings (llama.cpp requires them unique), a vocabulary larger than the
embedding. A vocabulary smaller than the embedding is padded with unused ``[PAD<id>]`` tokens, as
llama.cpp sizes the embedding from the token count.

Entries are ``(key, value, GGUFValueType, array element type or None)`` for ``GGUFWriter.add_key_value``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from gguf import GGUFValueType, Keys, TokenType

from .naming import ParameterNames

Entry = tuple[str, Any, GGUFValueType, GGUFValueType | None]

_GPT2_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}  # GPT-2's regex built in
_BARE_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}  # after an explicit Split
_SINGLE_DIGITS = {"type": "Digits", "individual_digits": True}


def _split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


# Llama 3's and Qwen2's split patterns (as they appear in their tokenizer.json): they differ in digits,
# runs of up to three for Llama 3, one at a time for Qwen2
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizer:
    """A tokenizer.json normalizer + pre-tokenizer that one of llama.cpp's built-in pre-tokenizers reproduces.

    A step matches when it has these values (other fields, e.g. ``trim_offsets``, do not change the
    splitting). ``ignore_merges``: llama.cpp takes a whole pre-token found in the vocabulary without
    merging for this name, so the BPE model must say the same.
    """

    steps: tuple[dict, ...]
    normalizer: str | None = None
    ignore_merges: bool = False


# llama.cpp's pre-tokenizer name (tokenizer.ggml.pre) -> what it reproduces; its regexes for each name are in
# src/llama-vocab.cpp, and the slow test checks that llama.cpp splits text as transformers does for each entry
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "gpt-2": PreTokenizer((_GPT2_BYTE_LEVEL,)),
    "smollm": PreTokenizer((_SINGLE_DIGITS, _GPT2_BYTE_LEVEL)),  # StarCoder's too: single digits, then GPT-2's regex
    "llama-bpe": PreTokenizer((_split(_LLAMA3_SPLIT), _BARE_BYTE_LEVEL), ignore_merges=True),
    # llama.cpp does not apply the NFC normalizer: text not in NFC (e.g. "cafe\u0301") splits differently there
    "qwen2": PreTokenizer((_split(_QWEN2_SPLIT), _BARE_BYTE_LEVEL), normalizer="NFC"),
}


def _remedy(names: ParameterNames) -> str:
    return (
        f"pass {names.passing('tokenizer_gguf')} a GGUF file of the base model converted by llama.cpp "
        "(convert_hf_to_gguf.py) to copy its vocabulary"
    )


def vocabulary(
    n_vocab: int,
    *,
    tokenizer=None,
    tokenizer_gguf: str | os.PathLike | None = None,
    tokenizer_pre: str | None = None,
    names: Mapping[str, str] | ParameterNames | None = None,
) -> list[Entry]:
    """The ``tokenizer.*`` metadata for a model whose embedding has ``n_vocab`` rows.

    ``tokenizer_gguf`` (copied) wins over ``tokenizer`` (a transformers fast tokenizer, built from its
    ``tokenizer.json``); with neither, ``ValueError``: llama.cpp cannot load a model without a vocabulary.
    ``names`` (``export_gguf``'s) words the messages for the caller's interface.
    """
    names = ParameterNames(names)
    if tokenizer_gguf is not None:
        return vocabulary_from_gguf(tokenizer_gguf, n_vocab, names=names)
    if tokenizer is not None:
        return vocabulary_from_tokenizer(tokenizer, n_vocab, pre=tokenizer_pre, names=names)
    raise ValueError(
        f"export_gguf needs the model's vocabulary (llama.cpp cannot run a GGUF without one): pass "
        f"{names.passing('tokenizer')} (the model's transformers tokenizer or its folder), or "
        f"{names.passing('tokenizer_gguf')} a GGUF file of the base model."
    )


# --- copied from a GGUF file ---------------------------------------------------------------------
def vocabulary_from_gguf(
    path: str | os.PathLike, n_vocab: int, *, names: Mapping[str, str] | ParameterNames | None = None
) -> list[Entry]:
    """Every ``tokenizer.*`` entry of the GGUF file ``path``, checked to hold ``n_vocab`` tokens."""
    path, source = Path(path), ParameterNames(names)("tokenizer_gguf")
    if not path.is_file():
        raise FileNotFoundError(f"{source} {path} does not exist.")
    reader = gguf.GGUFReader(path)
    entries = [_copy_field(field) for key, field in reader.fields.items() if key.startswith("tokenizer.")]
    keys = {entry[0]: entry for entry in entries}
    if Keys.Tokenizer.MODEL not in keys or Keys.Tokenizer.LIST not in keys:
        raise ValueError(f"{source} {path} holds no vocabulary ({Keys.Tokenizer.LIST}); pass another file.")
    n_tokens = len(keys[Keys.Tokenizer.LIST][1])
    if n_tokens != n_vocab:
        raise ValueError(
            f"{source} {path} holds {n_tokens:,} tokens but the model's embedding has {n_vocab:,} rows; pass the "
            "GGUF of the model this one was pruned from."
        )
    return entries


def _copy_field(field) -> Entry:
    """A reader field as a writer entry, strings as raw bytes (a token need not be valid UTF-8)."""
    kind = field.types[0]
    if kind == GGUFValueType.ARRAY:
        sub = field.types[-1]
        if len(field.types) != 2:
            raise ValueError(f"{field.name}: nested arrays are not copied.")
        if sub == GGUFValueType.STRING:
            return field.name, [bytes(field.parts[i]) for i in field.data], kind, sub
        return field.name, [v.item() for i in field.data for v in field.parts[i]], kind, sub
    if kind == GGUFValueType.STRING:
        return field.name, bytes(field.parts[field.data[0]]), kind, None
    return field.name, field.parts[field.data[0]][0].item(), kind, None


# --- built from a transformers tokenizer ---------------------------------------------------------
def vocabulary_from_tokenizer(
    tokenizer, n_vocab: int, *, pre: str | None = None, names: Mapping[str, str] | ParameterNames | None = None
) -> list[Entry]:
    """GPT-2-style BPE metadata from a transformers fast tokenizer (see the module docstring for what is refused)."""
    names = ParameterNames(names)
    spec = _tokenizer_json(tokenizer, names)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or not _is_byte_level(spec):
        kind = "BPE with byte fallback (SentencePiece style)" if model.get("byte_fallback") else model.get("type")
        raise ValueError(
            f"export_gguf builds llama.cpp vocabularies from byte-level BPE tokenizers (GPT-2 style) only; this one is "
            f"{kind}: {_remedy(names)}."
        )
    if pre is None:
        pre = pre_tokenizer_name(spec, names=names)
    elif pre not in PRE_TOKENIZERS:
        raise ValueError(f"{names('tokenizer_pre')}={pre!r} is not one of {sorted(PRE_TOKENIZERS)}.")
    tokens, types = _tokens(spec, n_vocab, names)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if not merges or any(m.count(" ") != 1 for m in merges):
        raise ValueError(f"the tokenizer's BPE merges are missing or hold spaces inside tokens: {_remedy(names)}.")
    t = Keys.Tokenizer
    entries: list[Entry] = [
        (t.MODEL, "gpt2", GGUFValueType.STRING, None),
        (t.PRE, pre, GGUFValueType.STRING, None),
        (t.LIST, tokens, GGUFValueType.ARRAY, GGUFValueType.STRING),
        (t.TOKEN_TYPE, [int(x) for x in types], GGUFValueType.ARRAY, GGUFValueType.INT32),
        (t.MERGES, merges, GGUFValueType.ARRAY, GGUFValueType.STRING),
    ]
    for key, attr in ((t.BOS_ID, "bos_token_id"), (t.EOS_ID, "eos_token_id"), (t.UNK_ID, "unk_token_id")):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            entries.append((key, int(value), GGUFValueType.UINT32, None))
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None:
        entries.append((t.PAD_ID, int(pad), GGUFValueType.UINT32, None))
    add_bos, add_eos = _added_special_tokens(tokenizer)
    entries.append((t.ADD_BOS, add_bos, GGUFValueType.BOOL, None))
    entries.append((t.ADD_EOS, add_eos, GGUFValueType.BOOL, None))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        entries.append((t.CHAT_TEMPLATE, template, GGUFValueType.STRING, None))
    return entries


def _tokenizer_json(tokenizer, names: ParameterNames) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"export_gguf reads the vocabulary from a fast tokenizer's tokenizer.json; {type(tokenizer).__name__} has "
            f"none: load it with AutoTokenizer (use_fast=True), or {_remedy(names)}."
        )
    return json.loads(backend.to_str())


def _steps(component: dict | None) -> list[dict]:
    """A normalizer or pre-tokenizer as its list of steps (a ``Sequence`` flattened)."""
    if not component:
        return []
    if component.get("type") == "Sequence":
        inner = component.get("pretokenizers") or component.get("normalizers") or []
        return [step for part in inner for step in _steps(part)]
    return [component]


def _is_byte_level(spec: dict) -> bool:
    return any(step.get("type") == "ByteLevel" for step in _steps(spec.get("pre_tokenizer")))


def pre_tokenizer_name(spec: dict, *, names: Mapping[str, str] | ParameterNames | None = None) -> str:
    """llama.cpp's name for the tokenizer.json ``spec``'s normalizer and pre-tokenizer (``PRE_TOKENIZERS``)."""
    names = ParameterNames(names)
    normalizers = [step.get("type") for step in _steps(spec.get("normalizer"))]
    steps = _steps(spec.get("pre_tokenizer"))
    ignore_merges = bool(spec["model"].get("ignore_merges"))
    for name, pre in PRE_TOKENIZERS.items():
        if normalizers != ([pre.normalizer] if pre.normalizer else []) or len(steps) != len(pre.steps):
            continue
        if ignore_merges == pre.ignore_merges and all(
            all(step.get(k) == v for k, v in want.items()) for step, want in zip(steps, pre.steps)
        ):
            return name
    described = [step.get("type") for step in steps]
    raise ValueError(
        f"the tokenizer's pre-tokenizer ({', '.join(map(str, described)) or 'none'}; normalizer "
        f"{', '.join(map(str, normalizers)) or 'none'}; ignore_merges {ignore_merges}) matches none of llama.cpp's built-in ones hf_flop recognises "
        f"({', '.join(PRE_TOKENIZERS)}): {_remedy(names)}, or pass {names.passing('tokenizer_pre')} the llama.cpp "
        "name whose splitting you know to match."
    )


def _tokens(spec: dict, n_vocab: int, names: ParameterNames) -> tuple[list[str], list[TokenType]]:
    """Token strings and types by id, padded to ``n_vocab`` with unused tokens."""
    by_id: dict[int, tuple[str, TokenType]] = {
        i: (text, TokenType.NORMAL) for text, i in spec["model"]["vocab"].items()
    }
    for added in spec.get("added_tokens") or []:
        if not added.get("special"):
            raise ValueError(f"the tokenizer's added token {added['content']!r} is not special: {_remedy(names)}.")
        by_id[added["id"]] = (added["content"], TokenType.CONTROL)
    if max(by_id) >= n_vocab:
        raise ValueError(
            f"the tokenizer has token id {max(by_id):,} but the model's embedding has {n_vocab:,} rows; pass the "
            "model's own tokenizer."
        )
    tokens, types = [], []
    for i in range(n_vocab):
        text, kind = by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED))
        tokens.append(text)
        types.append(kind)
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"the tokenizer has duplicate token strings, which llama.cpp refuses: {_remedy(names)}.")
    return tokens, types


def _added_special_tokens(tokenizer) -> tuple[bool, bool]:
    """Whether encoding adds a BOS token in front and an EOS token at the end (what llama.cpp should do too)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    if len(full) == len(plain):
        return False, False
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    return bool(full and full[0] == bos), bool(full and full[-1] == eos)
