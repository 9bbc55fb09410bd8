"""The Llama 3 tokenizer (tiktoken BPE, 128,000 merges + 256 special tokens) and its chat format.

Loads either Meta's `tokenizer.model` (base64 token + rank per line, read with tiktoken) or a
Hugging Face checkpoint's `tokenizer.json` (read with `tokenizers`). Special tokens are never
produced from plain text: "<|eot_id|>" typed by a user encodes as ordinary characters. Chats are
rendered with the checkpoint's own chat template, or Meta's Llama 3.1 format when it has none
(model/formats/chat_template.py).
"""

from __future__ import annotations

import base64
from pathlib import Path

import tiktoken
from tokenizers import Tokenizer as HFTokenizer

from model.formats import chat_template

PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_RESERVED = 256
NAMED_SPECIALS = {
    "<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|finetune_right_pad_id|>": 4,
    "<|start_header_id|>": 6, "<|end_header_id|>": 7, "<|eom_id|>": 8, "<|eot_id|>": 9, "<|python_tag|>": 10,
}


def special_tokens(num_base: int) -> dict[str, int]:
    """Llama 3's 256 special tokens after the base vocabulary; unnamed ones are reserved."""
    names = {v: k for k, v in NAMED_SPECIALS.items()}
    out, reserved = {}, 0
    for i in range(NUM_RESERVED):
        if i in names:
            out[names[i]] = num_base + i
        else:
            out[f"<|reserved_special_token_{reserved}|>"] = num_base + i
            reserved += 1
    return out


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            candidates = [path / "tokenizer.json", path / "tokenizer.model", path / "original" / "tokenizer.model"]
            found = [c for c in candidates if c.exists()]
            if not found:
                raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model")
            path = found[0]
        self.path = path
        self.chat_template = chat_template.load(path.parent)  # where tokenizer.json's checkpoint keeps it
        if path.suffix == ".json":
            self._load_hf(path)
        else:
            self._load_tiktoken(path)
        self.bos_id = self.special["<|begin_of_text|>"]
        self.eot_id = self.special["<|eot_id|>"]
        self.pad_id = self.special["<|finetune_right_pad_id|>"]
        self.stop_ids = frozenset(self.special[t] for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"))

    def _load_tiktoken(self, path: Path):
        ranks = {}
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
                except ValueError:
                    raise ValueError(f"{path}:{lineno}: expected 'base64-token rank'") from None
        self.special = special_tokens(len(ranks))
        self._tt = tiktoken.Encoding(name=path.name, pat_str=PATTERN, mergeable_ranks=ranks,
                                     special_tokens=self.special)
        self._hf = None
        self.vocab_size = len(ranks) + NUM_RESERVED

    def _load_hf(self, path: Path):
        self._hf = HFTokenizer.from_file(str(path))
        self._hf.encode_special_tokens = True  # plain text never yields special tokens
        self._tt = None
        added = {t.content: i for i, t in self._hf.get_added_tokens_decoder().items()}
        self.special = {k: v for k, v in added.items() if k.startswith("<|")}
        self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, bos: bool = False) -> list[int]:
        if self._tt is not None:
            ids = self._tt.encode(text, allowed_special=set(), disallowed_special=())
        else:
            ids = self._hf.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self._tt is not None:
            return self._tt.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=False)

    def token_bytes(self, i: int) -> bytes:
        """The bytes of one token (streaming decode must not split a UTF-8 character)."""
        if self._tt is not None:
            return self._tt.decode_single_token_bytes(int(i))
        return self._hf.decode([int(i)], skip_special_tokens=False).encode()

    def encode_chat(self, messages: list[dict], *, add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """The prompt tokens of a conversation under this tokenizer's chat template (as transformers'
        `apply_chat_template(messages, tokenize=True, ...)`); kwargs (tools, documents, …) go to the template.
        ChatTemplateError (a ValueError) names the bad message or the template's own complaint."""
        return chat_template.chat_ids(self, self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                      **kwargs)

    def chat_document(self, messages: list[dict], **kwargs) -> tuple[list[int], list[bool]]:
        """A conversation to train on: (ids, mask), the mask True on the assistant turns' content and end tokens."""
        return chat_template.chat_document(self, self.chat_template, messages, **kwargs)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes (ids 0-255) plus Llama 3's 256 special tokens at 256-511, with the same interface
    and chat format: the tokenizer of the `toy` preset, which trains in a minute on a laptop CPU."""

    VOCAB_SIZE = 512

    def __init__(self):
        self.path = None
        self.chat_template = chat_template.ChatTemplate.builtin()
        self.special = special_tokens(256)
        self.vocab_size = self.VOCAB_SIZE
        self._tt = self._hf = None
        self.bos_id = self.special["<|begin_of_text|>"]
        self.eot_id = self.special["<|eot_id|>"]
        self.pad_id = self.special["<|finetune_right_pad_id|>"]
        self.stop_ids = frozenset(self.special[t] for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"))
        self._names = {v: k for k, v in self.special.items()}

    def encode(self, text: str, *, bos: bool = False) -> list[int]:
        ids = list(text.encode())
        return [self.bos_id, *ids] if bos else ids

    def token_bytes(self, i: int) -> bytes:
        """Ids past the 512 of this vocabulary (a model with a larger vocab_size) decode to nothing."""
        i = int(i)
        return bytes([i]) if i < 256 else self._names[i].encode() if i in self._names else b""

    def decode(self, ids) -> str:
        return b"".join(self.token_bytes(int(i)) for i in ids).decode(errors="replace")


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """`"bytes"`, a tokenizer file, or a checkpoint directory holding one."""
    return ByteTokenizer() if str(spec) == "bytes" else Tokenizer(spec)
