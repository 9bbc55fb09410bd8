"""Block readers in our layout: regions [..., a:b, ...] of one layer of one parameter, read from an
Orbax checkpoint (TensorStore, dequantized when the checkpoint is quantized) or from an HF
directory (through the table's streams). Export, merge and verify are written against these."""

from __future__ import annotations

import numpy as np

from convert.layout import Stream
from convert.source import HFSource
from model.formats import checkpoint as ckpt
from model.network import quant


class OrbaxReader:
    def __init__(self, path):
        self.path = ckpt.as_path(path)
        if not ckpt.is_finished(self.path):
            raise ckpt.CheckpointFormatError(f"{self.path}: not a finished checkpoint (no {ckpt.COMMIT_FILE}, or "
                                             f"a temporary directory): an interrupted conversion?")
        self.cfg = ckpt.read_config(self.path)
        self.names = ckpt.param_names(self.path)
        self._arrays = {}

    def has(self, path) -> bool:
        return ckpt.param_name(path) in self.names

    def array(self, path):
        name = ckpt.param_name(path)
        if name not in self._arrays:
            if name not in self.names:
                raise ckpt.CheckpointFormatError(f"{self.path}: missing parameter {name!r}")
            self._arrays[name] = ckpt.open_array(self.path, name)
        return self._arrays[name]

    def quantized(self, s: Stream) -> bool:
        return s.path[-1] == "kernel" and self.has((*s.path[:-1], "scale"))

    def read_raw(self, s: Stream, layer, a: int, b: int, path=None) -> np.ndarray:
        """The stored region (integer for a quantized kernel)."""
        lead = (layer,) if s.stacked else ()
        arr = self.array(path or s.path)
        return arr[(*lead, *(slice(None),) * s.axis, slice(a, b))].read().result()

    def read_scale(self, s: Stream, layer, a: int, b: int) -> np.ndarray:
        arr = self.array((*s.path[:-1], "scale"))
        lead = (layer,) if s.stacked else ()
        row = arr.ndim - len(lead) - len(s.out_shape)
        return arr[(*lead, *(slice(None),) * row, slice(a, b))].read().result()

    def read(self, s: Stream, layer, a: int, b: int) -> np.ndarray:
        """The region as float: stored dtype, or float32 dequantized."""
        region = self.read_raw(s, layer, a, b)
        if not self.quantized(s):
            return region

        scale = self.read_scale(s, layer, a, b)
        return np.asarray(quant.dequantize(region, scale, self.cfg.quant, s.in_shape, region.shape[s.axis:]))

    def chunk(self, s: Stream) -> int:
        """The array's chunk extent along the stream's row axis (blocks that divide it read each chunk once)."""
        try:
            return int(self.array(s.path).chunk_layout.read_chunk.shape[(1 if s.stacked else 0) + s.axis])
        except (TypeError, AttributeError):
            return 1


class HFReader:
    def __init__(self, src: HFSource):
        self.src = src
        self.cfg = src.config

    def read(self, s: Stream, layer, a: int, b: int) -> np.ndarray:
        name = s.entry.hf.format(i=layer) if s.stacked else s.entry.hf
        return s.to_ours(self.src.read_rows(name, *s.hf_rows(a, b)), a, b, name)

    def quantized(self, s: Stream) -> bool:
        return False

    def chunk(self, s: Stream) -> int:
        return 1
