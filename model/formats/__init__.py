"""Formats and loading: the HF name table, safetensors, Orbax, PEFT, tokenizers, `load`."""
