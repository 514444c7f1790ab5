"""Runners: one per subgraph, one lifecycle, one contract (Polygraphy's loader/runner idea).

    runners = make_runners("onnxruntime", bundle)   # runtime.backends: {subgraph: runner}
    with runners["decoder_pre"] as runner:          # activate ... deactivate
        outputs = runner.infer(feeds)               # {name: array}, inputs checked against the manifest

Backends, each in its own module, imported lazily through the registry (runtime.backends): ONNX
Runtime (runtime.backends.ort), TensorRT (runtime.backends.trt), and the workstation's PyTorch
(export.torch_backend, a plugin: the reference modules, for debugging and parity). Feeds and
outputs are numpy arrays, except that a runner may return, and accept back, device tensors
(`keep_on_device=True`, `stage`, `take_rows`) so hidden states go from decoder_pre to
decoder_post without a trip through host memory.
"""

from __future__ import annotations

import time
import numpy as np

from runtime.bundle import FULL_PROFILE, SubgraphEntry
from runtime.errors import LladaVError


class Runner:
    """Base: input checks against the manifest, timing, the lifecycle."""

    def __init__(self, entry: SubgraphEntry, float_dtype: np.dtype):
        self.entry, self.float_dtype = entry, float_dtype
        self.name = entry.name
        self.active = False
        self._seconds = 0.0

    def __enter__(self):
        self.activate()
        return self

    def __exit__(self, *exc):
        self.deactivate()

    def activate(self):
        if not self.active:
            self._activate()
            self.active = True

    def deactivate(self):
        if self.active:
            self._deactivate()
            self.active = False

    def expected_dtype(self, dtype: str) -> np.dtype:
        return self.float_dtype if dtype == "float" else np.dtype(dtype)

    def check(self, feeds: dict, profile: int = FULL_PROFILE) -> None:
        """Names, dtypes, ranks, and every dim inside the bundle's optimization profile `profile`."""
        if not 0 <= profile < len(self.entry.shapes):
            raise LladaVError(f"{self.name}: optimization profile {profile}; the bundle's engine has "
                              f"{len(self.entry.shapes)} (0 to {len(self.entry.shapes) - 1})")
        shapes = self.entry.shapes[profile]
        names = [t.name for t in self.entry.inputs]
        if sorted(feeds) != sorted(names):
            raise LladaVError(f"{self.name}: inputs {sorted(feeds)}; expected {names}")
        for t in self.entry.inputs:
            dtype, shape = self.describe(feeds[t.name])
            want = self.expected_dtype(t.dtype)
            if dtype != want:
                raise LladaVError(f"{self.name}: input '{t.name}' has dtype {dtype}; expected {want}")
            lo, hi = shapes[t.name]["min"], shapes[t.name]["max"]
            if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi)):
                raise LladaVError(f"{self.name}: input '{t.name}' has shape {shape}; expected between "
                                  f"{tuple(lo)} and {tuple(hi)} (the bundle's engine profile {profile})")

    def infer(self, feeds: dict, keep_on_device: bool = False, profile: int = FULL_PROFILE) -> dict:
        """profile: the engine's optimization profile the feeds belong to (runtime.bundle.FULL_PROFILE, or
        CACHED_PROFILE for a cached step); host backends check the shapes against it and run the same graph."""
        if not self.active:
            raise LladaVError(f"{self.name}: runner used before activate()")
        self.check(feeds, profile)
        start = time.perf_counter()
        out = self._infer(feeds, keep_on_device, profile)
        self._seconds = time.perf_counter() - start
        return out

    def last_ms(self) -> float:
        """Time of the last infer(): host wall clock here; GPU time from CUDA events on TensorRT."""
        return self._seconds * 1000

    # device helpers; host backends keep numpy arrays, so these are identities
    def describe(self, x) -> tuple[np.dtype, tuple]:
        """(dtype, shape) of a feed: numpy here, the backend's device arrays in subclasses."""
        return np.dtype(x.dtype), tuple(x.shape)

    def to_host(self, x) -> np.ndarray:
        return x

    def take_rows(self, x, rows: np.ndarray, tensor: str):
        """x[:, rows] along the sequence axis, placed where this runner's input `tensor` lives."""
        return np.ascontiguousarray(np.asarray(x)[:, rows])

    def stage(self, tensor: str, x: np.ndarray):
        """A copy of host array x, placed where this runner's input `tensor` lives, that later infer()
        calls (of this runner or the next) take as a feed."""
        return np.array(x)

    def write_rows(self, staged, start: int, rows: np.ndarray) -> None:
        """staged[:, start:start + len(rows)] = rows (same for every batch entry): a partial upload."""
        staged[:, start : start + rows.shape[0]] = rows

    def gather_past(self, x, rows: np.ndarray, tensor: str):
        """x[:, :, :, rows] of a (layers, batch, heads, rows, head dim) K/V output, placed where this
        runner's cached-profile input `tensor` (past_keys, past_values) lives."""
        return np.ascontiguousarray(np.asarray(self.to_host(x))[:, :, :, rows])

    def _activate(self):
        raise NotImplementedError

    def _deactivate(self):
        pass

    def _infer(self, feeds, keep_on_device, profile):
        raise NotImplementedError
