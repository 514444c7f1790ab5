"""The ONNX Runtime backend: the one session loader (the runtime's runners, the export's validation,
calib/ and bench/ all open graphs through `ort_session`) and `OrtRunner` (CPU here; CUDA where
onnxruntime-gpu and a GPU exist, with IO binding)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.backends.base import Runner
from runtime.errors import LladaVError

# ONNX Runtime's common-subexpression elimination merges the dedicated Q/DQ pair a quantized graph
# gives each linear layer (TensorRT shares no Q/DQ pair between nodes) back into one Q per shared
# input; ONNX Runtime's CPU fusion of Q -> DQ -> MatMul into an integer GEMM (MatMulIntegerToFloat)
# then skips every linear layer that shares its input (q/k/v, gate/up), which runs as a float GEMM
# on weights dequantized at every run (measured: docs/quantization.md). Off for quantized graphs.
QDQ_DISABLED_OPTIMIZERS = ["CommonSubexpressionElimination"]


def ort_session(path: Path, device: str = "cpu", quantized: bool = False, exact: bool = False, what: str = ""):
    """An ONNX Runtime session on graph `path`. device: cpu, or cuda (the CUDA provider first);
    quantized: the optimizer settings Q/DQ graphs need (QDQ_DISABLED_OPTIMIZERS); exact: basic graph
    optimizations only, so the graph's own arithmetic runs (the extended level fuses int4
    DequantizeLinear + MatMul into MatMulNBits, which computes with int8 activations: validation
    uses it). what: who opens it, for the error (default: the file's name)."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise LladaVError("onnxruntime: CUDA asked for, but this onnxruntime has no CUDAExecutionProvider "
                              "(install the gpu extra: pip install -e '.[gpu]')")
        providers.insert(0, "CUDAExecutionProvider")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if exact:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    # decoder_pre and decoder_post alternate every step, each with its own intra-op pool; a
    # pool that spin-waits after its run steals the cores the other session needs (measured on
    # 2 cores: unpruned 7.1 s -> 6.0 s, K=15 P=50 4.0 s -> 3.1 s for 32 steps).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), opts, providers=providers,
                                    disabled_optimizers=QDQ_DISABLED_OPTIMIZERS if quantized else [])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise LladaVError(f"{what or Path(path).name}: cannot load {Path(path).name} ({exc})") from None


class OrtRunner(Runner):
    """ONNX Runtime: CUDA provider where available and asked for, else CPU; IO binding."""

    def __init__(self, entry, bundle, device: str = "cpu"):
        """entry: the subgraph's manifest entry in `bundle` (runtime.bundle.Bundle)."""
        super().__init__(entry, bundle.float_dtype)
        self.path, self.device = bundle.root / entry.onnx.path, device

    def _activate(self):
        self.session = ort_session(self.path, self.device, quantized=bool(self.entry.quantization), what=self.name)

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
