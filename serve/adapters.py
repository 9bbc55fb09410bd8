"""The LoRA adapters an engine serves side by side (vLLM's multi-LoRA): names, device slots, loading.

The served model is built with adapter slots (`lora.LoraSlots`: `engine.max_loras` slots of rank
`engine.max_lora_rank` on every target layer, all zero); each loaded adapter takes one slot, its ranks
zero-padded and its scale folded into B, and each token of a step names its slot (serve/step.py
`Batch.adapters`), so requests for different adapters and for the base decode in the same step.

    AdapterSlots.read(name, path)    reads and checks an adapter on the host (no state changes)
    AdapterSlots.claim(...)          takes a free slot under the name; `write_slot` puts the weights there
    AdapterSlots.acquire / release   a request's hold on its adapter
    AdapterSlots.unload(name)        the name goes at once (new requests: unknown); the slot is free when the
                                     requests already using it have finished (they finish, with the adapter)

Each load gets a new `uid`, never reused: the prefix cache keys blocks by it (serve/blocks.py), so an
adapter loaded into a slot another had never reuses that one's cached keys/values.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading

import jax
import numpy as np
from flax import nnx

from model.formats.peft import AdapterError
from model.job.adapters import read_adapter
from model.network.config import LlamaConfig
from model.network.lora import LoraSlots


class LoraRequestError(ValueError):
    """A refused load/unload/use of an adapter: `status` and `code` for the HTTP answer."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_lora_adapter"):
        super().__init__(message)
        self.status, self.code = status, code


@dataclasses.dataclass(eq=False)
class Adapter:
    name: str
    path: str
    row: int  # the token row value naming its slot (slot row - 1 of the stacked weights); 0 is the base
    uid: int  # unique per load
    rank: int


@dataclasses.dataclass(frozen=True)
class HostAdapter:
    """An adapter read and checked, in the slot layout: {model path of lora_a/lora_b: [L, ...] padded}."""

    rank: int
    values: dict


class AdapterSlots:
    """Names -> slots of one engine. Thread-safe."""

    def __init__(self, base: LlamaConfig, slots: LoraSlots | None):
        self.base = base.replace(quant=None, lora=None)
        self.slots = slots
        self.by_name: dict[str, Adapter] = {}
        self.free = list(range(1, (slots.slots if slots else 0) + 1))
        self.users: collections.Counter = collections.Counter()  # requests holding each adapter (by uid)
        self.draining: dict[int, Adapter] = {}  # unloaded, still used
        self._uids = itertools.count(1)
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        with self._lock:
            return list(self.by_name)

    def cards(self) -> list[dict]:
        with self._lock:
            return [{"name": a.name, "path": a.path, "rank": a.rank} for a in self.by_name.values()]

    def _need_slots(self):
        if self.slots is None:
            raise LoraRequestError("this server has no adapter slots: start it with model.lora_modules or "
                                   "server.runtime_lora=true (engine.max_loras slots)", code="lora_disabled")

    # ------------------------------------------------------------------------------------------
    # loading

    def read(self, name: str, path: str, shapes: dict) -> HostAdapter:
        """The adapter at `path` in the slot layout (`shapes`: each slot variable's shape without its slot
        axis, by model path); LoraRequestError if it cannot serve here."""
        self._need_slots()
        if not name or not isinstance(name, str):
            raise LoraRequestError("'lora_name' must be a non-empty string", code="invalid_value")
        if name in self.by_name:
            raise LoraRequestError(f"an adapter named {name!r} is already loaded", code="lora_exists")
        try:
            lc, flat = read_adapter(path, self.base)
        except (AdapterError, FileNotFoundError, OSError, ValueError) as e:
            raise LoraRequestError(f"cannot load adapter {name!r} from {path}: {e}", code="invalid_lora_path") from None
        if lc.rank > self.slots.rank:
            raise LoraRequestError(f"adapter {name!r} has rank {lc.rank}, above engine.max_lora_rank="
                                   f"{self.slots.rank}", code="lora_rank_too_large")
        extra = sorted("/".join(p) for p in flat if p not in shapes)
        if extra:
            raise LoraRequestError(f"adapter {name!r}: tensor {extra[0]} has no slot in this model "
                                   f"(served targets: {', '.join(self.slots.targets)})", code="invalid_lora_adapter")
        values = {}
        for path_, shape in shapes.items():
            values[path_] = self._padded(name, path_, shape, flat.get(path_), lc.scale, lc.rank)
        return HostAdapter(lc.rank, values)

    @staticmethod
    def _padded(name, path, shape, value, scale, rank) -> np.ndarray:
        """value [L, *in, r] (lora_a) or [L, r, *out] (lora_b) -> `shape` (rank R), zero-padded; B scaled."""
        out = np.zeros(shape, np.float32)
        if value is None:
            return out
        is_a = path[-1] == "lora_a"
        want = (*shape[:-1], rank) if is_a else (shape[0], rank, *shape[2:])
        if tuple(value.shape) != want:
            raise LoraRequestError(f"adapter {name!r}: {'/'.join(path)} has shape {list(value.shape)}, this model "
                                   f"needs {list(want)} (another base model?)", code="invalid_lora_adapter")
        if is_a:
            out[..., :rank] = value
        else:
            out[:, :rank] = np.asarray(value, np.float32) * scale
        return out

    def claim(self, name: str, path: str, rank: int) -> Adapter:
        with self._lock:
            if name in self.by_name:
                raise LoraRequestError(f"an adapter named {name!r} is already loaded", code="lora_exists")
            if not self.free:
                raise LoraRequestError(f"no free adapter slot (engine.max_loras={self.slots.slots}); unload one "
                                       f"first", code="no_free_lora_slot")
            a = Adapter(name, path, self.free.pop(0), next(self._uids), rank)
            self.by_name[name] = a
            return a

    def unclaim(self, a: Adapter):
        with self._lock:
            del self.by_name[a.name]
            self.free.insert(0, a.row)

    def unload(self, name: str) -> Adapter:
        with self._lock:
            a = self.by_name.pop(name, None)
            if a is None:
                raise LoraRequestError(f"no adapter named {name!r} is loaded", status=404, code="lora_not_found")
            if self.users[a.uid]:
                self.draining[a.uid] = a
            else:
                self.free.append(a.row)
            return a

    # ------------------------------------------------------------------------------------------
    # requests

    def acquire(self, name: str) -> Adapter:
        with self._lock:
            a = self.by_name.get(name)
            if a is None:
                raise LoraRequestError(f"no adapter named {name!r} is loaded", status=404, code="model_not_found")
            self.users[a.uid] += 1
            return a

    def release(self, a: Adapter):
        with self._lock:
            self.users[a.uid] -= 1
            if not self.users[a.uid]:
                del self.users[a.uid]
                if self.draining.pop(a.uid, None) is not None:
                    self.free.append(a.row)


# ---------------------------------------------------------------------------------------------
# the slot variables of an engine's weights (serve/layout.py: scan or unrolled)

def slot_variables(weights) -> dict[tuple[str, ...], list[nnx.Variable]]:
    """Every adapter-slot variable by its model path (("layers", "attn", "q", "lora_a")): one stacked
    [L, slots, ...] (scan layout), or one [slots, ...] per layer (unrolled)."""
    state, layers = weights
    if layers is None:
        return {tuple(map(str, p)): [v] for p, v in nnx.to_flat_state(state) if isinstance(v, nnx.LoRAParam)}
    out: dict = {}
    for layer in layers:
        for p, v in nnx.to_flat_state(layer):
            if isinstance(v, nnx.LoRAParam):
                out.setdefault(("layers", *map(str, p)), []).append(v)
    return out


def slot_shapes(weights) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Each slot variable's shape as an adapter tensor has it: [L, *in, R] / [L, R, *out] (no slot axis)."""
    out, stacked = {}, weights[1] is None
    for path, vs in slot_variables(weights).items():
        shape = tuple(vs[0].shape)
        out[path] = (shape[0], *shape[2:]) if stacked else (len(vs), *shape[1:])
    return out


_PUT: dict = {}


def _put(sharding, axis: int):
    key = (sharding, axis)
    if key not in _PUT:
        def put(arr, value, row):
            return jax.lax.dynamic_update_index_in_dim(arr, value.astype(arr.dtype), row - 1, axis)
        _PUT[key] = jax.jit(put, donate_argnums=0, out_shardings=sharding)
    return _PUT[key]


def write_slot(weights, row: int, host: HostAdapter) -> None:
    """Puts the adapter into slot `row` of every slot variable (in place, in their shardings)."""
    stacked = weights[1] is None
    for path, vs in slot_variables(weights).items():
        value = host.values[path]
        if stacked:
            v = vs[0]
            v.set_value(_put(v.get_value().sharding, 1)(v.get_value(), value, np.int32(row)))
            continue
        for i, v in enumerate(vs):
            v.set_value(_put(v.get_value().sharding, 0)(v.get_value(), value[i], np.int32(row)))
