"""The record a pruning loop hands one layer's attention: what to compute, and where the layer writes its scores.

The loop passes it to the layer as the keyword `ivtp_probe` and reads it after the layer returns, so the layer must
see the very object the loop holds. accelerate's dispatch hooks (a model loaded with `device_map`, or with CPU or
disk offload) move every keyword of a layer to the layer's device first. They rebuild any Mapping, a dict
included, as a new one, and what the layer wrote there would be lost. For any other object they call `.to(device)`
and pass on what it returns. So `Probe` is not a Mapping: its `.to()` moves the tensors the loop put in, in place,
and returns the same object.
"""

from __future__ import annotations

import functools

import torch


def profiled(name: str):
    """A decorator: the function runs inside the profiler range `name` (what `ivtp bench` prices as scoring).
    record_function itself as a decorator breaks a compiled graph; as a context manager, dynamo skips it."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with torch.profiler.record_function(name):
                return fn(*args, **kwargs)
        return inner
    return wrap


def _moved(value, device, non_blocking: bool):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, tuple) and any(isinstance(v, torch.Tensor) for v in value):  # e.g. RoPE's (cos, sin)
        return tuple(_moved(v, device, non_blocking) for v in value)
    return value


class Probe:
    """A mutable record with dict-style access (`probe["attn"]`, `.get`, `in`, `.update`)."""

    __slots__ = ("_items",)

    def __init__(self, **items):
        self._items = dict(items)

    def __getitem__(self, key: str):
        return self._items[key]

    def __setitem__(self, key: str, value) -> None:
        self._items[key] = value

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str, default=None):
        return self._items.get(key, default)

    def update(self, items: dict) -> None:
        self._items.update(items)

    def to(self, device, non_blocking: bool = False) -> "Probe":
        """Move the tensors it holds to `device`, in place; the same object comes back."""
        for key, value in self._items.items():
            self._items[key] = _moved(value, device, non_blocking)
        return self

    def __repr__(self) -> str:
        return f"Probe({', '.join(self._items)})"
