"""The Llama 3 tokenizer on the real vocabulary file shipped in the `llama-models` package."""

import importlib.resources
import inspect
import json

import pytest

from model.formats.tokenizer import Tokenizer

MODEL_FILE = importlib.resources.files("llama_models") / "llama3" / "tokenizer.model"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(MODEL_FILE)


@pytest.fixture(scope="module")
def hf_tok_dir(tmp_path_factory, tok):
    """An HF-style tokenizer.json made by transformers' own tiktoken converter (an independent oracle)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    d = tmp_path_factory.mktemp("hf_tok")
    specials = sorted(tok.special, key=tok.special.get)
    TikTokenConverter(vocab_file=str(MODEL_FILE), extra_special_tokens=specials).converted().save(str(d / "tokenizer.json"))
    return d


def test_known_ids(tok):
    assert tok.vocab_size == 128256
    assert tok.encode("Hello, world!") == [9906, 11, 1917, 0]
    assert tok.encode("hello world", bos=True) == [128000, 15339, 1917]
    assert tok.special["<|eot_id|>"] == 128009 and tok.special["<|python_tag|>"] == 128010
    assert tok.special["<|reserved_special_token_0|>"] == 128002
    assert tok.stop_ids == {128001, 128008, 128009}


def test_chat_format(tok):
    ids = tok.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert ids[:2] == [128000, 128006]
    assert tok.decode(ids) == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                               "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                               "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert ids[-4:] == [128006, 78191, 128007, 271]  # "assistant", "\n\n"
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        tok.encode_chat([{"role": "user"}])


def test_special_tokens_not_produced_from_text(tok, hf_tok_dir):
    for t in (tok, Tokenizer(hf_tok_dir)):
        ids = t.encode("<|eot_id|><|begin_of_text|> and <|start_header_id|>")
        assert not set(ids) & set(t.special.values())
        assert t.decode(ids) == "<|eot_id|><|begin_of_text|> and <|start_header_id|>"


def test_matches_transformers_tokenizer_and_round_trips(tok, hf_tok_dir):
    hf = Tokenizer(hf_tok_dir)
    assert hf.vocab_size == tok.vocab_size and hf.special == tok.special
    texts = [inspect.getsource(json), "Ünïcödé — 日本語のテキスト 🦙\r\n\ttabs  and   spaces 12345678",
             "x" * 1000 + " 3.14159 don't WE'LL", ""]
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf.encode(text)
        assert tok.decode(ids) == text
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()
