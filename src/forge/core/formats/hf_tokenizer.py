"""Hugging Face tokenizer files: the tokenizer, its special tokens and chat template, read and written.

A folder's tokenizer is ``tokenizer.json``; its special tokens come from ``tokenizer_config.json``,
``special_tokens_map.json``, ``generation_config.json`` and ``config.json``, in the order transformers
reads them, and its chat template from ``chat_template.jinja``, ``chat_template.json`` or
``tokenizer_config.json``. Writing produces the same files, with a post-processor that prepends bos
when the model wants it, since transformers' fast tokenizer ignores the ``add_bos_token`` flag.

>>> tokenizer, tokenizer_json = read_tokenizer(Path("path/to/SmolLM2-135M"))  # doctest: +SKIP
>>> read_special_tokens(Path("path/to/SmolLM2-135M"), hf_config, tokenizer, tokenizer_json).eos  # doctest: +SKIP
'<|im_end|>'
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from forge.core.formats import SpecialTokens
from forge.errors import CheckpointError, ConfigError

__all__ = ["json_bytes", "read_chat_template", "read_json", "read_special_tokens", "read_tokenizer", "tokenizer_files"]

#: End-of-turn tokens of common chat formats: ChatML (Qwen2, SmolLM2), Llama 3, Phi-3.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>")
_TOKENIZER = "tokenizer.json"


def read_json(path: Path) -> Any:
    """The parsed file, or None if it does not exist."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({e}); download or write it again") from None


def json_bytes(value: Any) -> bytes:
    """A folder's JSON file as written: indented, UTF-8."""
    return json.dumps(value, indent=2, ensure_ascii=False).encode()


# -- reading ------------------------------------------------------------------------------------------------------


def read_tokenizer(root: Path) -> tuple[HFTokenizer, dict[str, Any]]:
    """The folder's ``tokenizer.json``, as a tokenizer and as parsed JSON."""
    if not (root / _TOKENIZER).is_file():
        raise CheckpointError(
            f"{str(root)!r} has no {_TOKENIZER}; Forge needs the fast-tokenizer file, which "
            "`AutoTokenizer.from_pretrained(folder).save_pretrained(folder)` in transformers writes"
        )
    try:
        tokenizer = HFTokenizer.from_file(str(root / _TOKENIZER))
        tokenizer_json = json.loads((root / _TOKENIZER).read_text(encoding="utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise CheckpointError(f"{str(root / _TOKENIZER)!r} could not be read ({e}); download it again") from None
    return tokenizer, tokenizer_json


def _token(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    return [i for i in value if isinstance(i, int)] if isinstance(value, list) else []


def read_special_tokens(
    root: Path, hf_config: dict[str, Any], tokenizer: HFTokenizer, tokenizer_json: dict[str, Any]
) -> SpecialTokens:
    """The special tokens, as transformers finds them in the folder's JSON files, kept if the vocabulary has them."""
    tok_config = read_json(root / "tokenizer_config.json") or {}
    tok_map = read_json(root / "special_tokens_map.json") or {}
    generation = read_json(root / "generation_config.json") or {}

    def known(token: str | None) -> str | None:
        return token if token is not None and tokenizer.token_to_id(token) is not None else None

    def named(key: str) -> str | None:
        # transformers lets special_tokens_map.json override tokenizer_config.json.
        return known(_token(tok_map.get(key)) or _token(tok_config.get(key)))

    def token(key: str) -> str | None:
        if key in tok_map or key in tok_config:  # even when null, as Qwen2's "bos_token": null
            return named(key)
        # Some folders (GPT-2's) name special tokens only by id, in generation_config.json or config.json.
        ids = _ids(generation.get(f"{key}_id", hf_config.get(f"{key}_id")))
        return known(tokenizer.id_to_token(ids[0])) if ids else None

    bos, eos = token("bos_token"), token("eos_token")
    eos_ids = _ids(generation.get("eos_token_id", hf_config.get("eos_token_id")))
    stop: list[str] = []
    for token in (eos, *(tokenizer.id_to_token(i) for i in eos_ids), *_END_OF_TURN):
        if known(token) and token not in stop:
            stop.append(token)  # type: ignore[arg-type]
    return SpecialTokens(
        bos=bos,
        eos=eos,
        pad=named("pad_token"),
        unk=named("unk_token"),
        stop=stop,
        add_bos=bos is not None and _adds_bos(tok_config, tokenizer_json.get("post_processor"), bos),
    )


def _adds_bos(tok_config: dict[str, Any], post_processor: dict[str, Any] | None, bos: str) -> bool:
    """Whether transformers' tokenizer prepends bos: Forge encodes without special tokens and adds it itself."""
    flag = tok_config.get("add_bos_token")
    llama_class = str(tok_config.get("tokenizer_class", "")).startswith(("LlamaTokenizer", "CodeLlamaTokenizer"))
    if flag is not None and llama_class:
        return bool(flag)  # LlamaTokenizerFast rebuilds its post-processor from this flag
    if _post_processor_bos(post_processor) == bos:
        return True  # e.g. Llama 3, whose PreTrainedTokenizerFast ignores the flag
    return bool(flag) if flag is not None else llama_class  # LlamaTokenizer defaults to True


def _post_processor_bos(processor: dict[str, Any] | None) -> str | None:
    """The special token a tokenizer.json post-processor puts first in a single sequence, if any."""
    if not isinstance(processor, dict):
        return None
    kind = processor.get("type")
    if kind == "Sequence":
        firsts = [_post_processor_bos(p) for p in processor.get("processors", [])]
        return next((t for t in firsts if t is not None), None)
    if kind == "TemplateProcessing":
        single = processor.get("single") or [{}]
        return single[0].get("SpecialToken", {}).get("id")
    if kind in ("BertProcessing", "RobertaProcessing"):
        return processor.get("cls", [None])[0]
    return None


def read_chat_template(root: Path) -> str | None:
    """From chat_template.jinja, chat_template.json or tokenizer_config.json, in the order transformers prefers."""
    if (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        template = (read_json(root / name) or {}).get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if isinstance(template, str):
            return template
    return None


# -- writing ------------------------------------------------------------------------------------------------------


def tokenizer_files(
    tokenizer: HFTokenizer, special: SpecialTokens, chat_template: str | None, context_length: int
) -> tuple[dict[str, int | None], dict[str, bytes]]:
    """The special token ids config.json records, and the tokenizer's files by name, for ``write_hf``."""

    def token_id(role: str, token: str | None) -> int | None:
        if token is None:
            return None
        i = tokenizer.token_to_id(token)
        if i is None:
            raise ConfigError(f"write_hf(): special.{role} = {token!r} is not in the tokenizer's vocabulary")
        return i

    bos_id, eos_id, pad_id = (token_id(r, getattr(special, r)) for r in ("bos", "eos", "pad"))
    token_id("unk", special.unk)
    # Like forge.tokenizer.Tokenizer, skip stop tokens the vocabulary lacks.
    stop_ids = list(dict.fromkeys(i for i in (eos_id, *map(tokenizer.token_to_id, special.stop)) if i is not None))
    specials = {"bos_token": special.bos, "eos_token": special.eos, "pad_token": special.pad, "unk_token": special.unk}
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": special.add_bos,
        "add_eos_token": False,
        "model_max_length": context_length,
        "clean_up_tokenization_spaces": False,
        **({"chat_template": chat_template} if chat_template is not None else {}),
    }
    generation = {
        "bos_token_id": bos_id,
        # Every stop token ends HF's generate() too, as it ends Forge's.
        "eos_token_id": stop_ids[0] if len(stop_ids) == 1 else (stop_ids or None),
        "pad_token_id": pad_id,
    }
    files = {
        "tokenizer_config.json": tok_config,
        "special_tokens_map.json": {k: v for k, v in specials.items() if v is not None},
        "generation_config.json": generation,
    }
    data = {name: json_bytes(value) for name, value in files.items()}
    data[_TOKENIZER] = _with_bos(tokenizer, special).to_str().encode()
    return {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}, data


def _with_bos(tokenizer: HFTokenizer, special: SpecialTokens) -> HFTokenizer:
    """The tokenizer, made to prepend bos when the model wants it.

    PreTrainedTokenizerFast adds what tokenizer.json's post-processor adds, and
    ignores the add_bos_token flag, so the post-processor must say it.
    """
    post = json.loads(tokenizer.to_str()).get("post_processor")
    if not special.add_bos or special.bos is None or _post_processor_bos(post) == special.bos:
        return tokenizer
    bos, bos_id = special.bos, tokenizer.token_to_id(special.bos)
    template = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
    )
    copy = HFTokenizer.from_str(tokenizer.to_str())
    copy.post_processor = processors.Sequence([copy.post_processor, template]) if copy.post_processor else template
    return copy
