"""Runners: one per subgraph, one lifecycle, one contract (Polygraphy's loader/runner idea).

    runners = make_runners("onnxruntime", bundle, manifest)   # runtime.backends: {subgraph: runner}
    with runners["decoder_pre"] as runner:                       # activate ... deactivate
        outputs = runner.infer(feeds)  # {name: array}, inputs checked against the manifest

Backends: ONNX Runtime (CPU here; CUDA where onnxruntime-gpu and a GPU exist, with IO binding),
PyTorch (the reference modules, for debugging and parity; needs the checkpoint), TensorRT
(`runtime.trt_runner`, imported lazily). Feeds and outputs are numpy arrays, except that a
runner may return, and accept back, device tensors (`keep_on_device=True`, `stage`,
`take_rows`) so hidden states go from decoder_pre to decoder_post without a trip through host
memory.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from runtime.bundle import FULL_PROFILE, Manifest, SubgraphEntry, float_type
from runtime.errors import LladaVError

# ONNX Runtime's common-subexpression elimination merges the dedicated Q/DQ pair a quantized graph
# gives each linear layer (TensorRT shares no Q/DQ pair between nodes) back into one Q per shared
# input; ONNX Runtime's CPU fusion of Q -> DQ -> MatMul into an integer GEMM (MatMulIntegerToFloat)
# then skips every linear layer that shares its input (q/k/v, gate/up), which runs as a float GEMM
# on weights dequantized at every run (measured: docs/quantization.md). Off for quantized graphs.
QDQ_DISABLED_OPTIMIZERS = ["CommonSubexpressionElimination"]


def float_dtype(manifest: Manifest) -> np.dtype:
    """The graphs' float inputs and outputs (runtime.bundle.float_type)."""
    return np.dtype(float_type(manifest.graphs_float()))


class Runner:
    """Base: input checks against the manifest, timing, the lifecycle."""

    def __init__(self, entry: SubgraphEntry, fdt: np.dtype):
        self.entry, self.fdt = entry, fdt
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
        return self.fdt if dtype == "float" else np.dtype(dtype)

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


class OrtRunner(Runner):
    """ONNX Runtime: CUDA provider where available and asked for, else CPU; IO binding."""

    def __init__(self, entry, fdt, bundle: Path, device: str = "cpu"):
        super().__init__(entry, fdt)
        self.path, self.device = bundle / entry.onnx.path, device

    def _activate(self):
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if self.device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise LladaVError("onnxruntime: CUDA asked for, but this onnxruntime has no CUDAExecutionProvider "
                                  "(install the gpu extra: pip install -e '.[gpu]')")
            providers.insert(0, "CUDAExecutionProvider")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # decoder_pre and decoder_post alternate every step, each with its own intra-op pool; a
        # pool that spin-waits after its run steals the cores the other session needs (measured on
        # 2 cores: unpruned 7.1 s -> 6.0 s, K=15 P=50 4.0 s -> 3.1 s for 32 steps).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=providers,
                                                disabled_optimizers=QDQ_DISABLED_OPTIMIZERS if self.entry.quantization else [])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise LladaVError(f"{self.name}: cannot load {self.path.name} ({exc})") from None

    def _deactivate(self):
        self.session = None

    def _infer(self, feeds, keep_on_device, profile):
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, x in feeds.items():
            if isinstance(x, ort.OrtValue):
                binding.bind_ortvalue_input(name, x)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(x))
        for out in self.session.get_outputs():
            binding.bind_output(out.name, self.device)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        names = [o.name for o in self.session.get_outputs()]
        if keep_on_device:
            return dict(zip(names, values))
        return {n: v.numpy() for n, v in zip(names, values)}

    ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}

    def describe(self, x):
        if isinstance(x, np.ndarray):
            return super().describe(x)
        return np.dtype(self.ORT_TYPES.get(x.data_type(), np.void)), tuple(x.shape())

    def to_host(self, x):
        return x if isinstance(x, np.ndarray) else x.numpy()

    def take_rows(self, x, rows, tensor):
        return np.ascontiguousarray(self.to_host(x)[:, rows])  # once per generation (step 1)
