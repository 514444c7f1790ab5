"""The backend registry: `make_runners(backend, ...)` -> {subgraph name: runner} (runtime.runners'
contract). Each backend's module is imported only when it is asked for: ONNX Runtime and the
PyTorch reference modules (runtime.runners), TensorRT (runtime.trt_runner)."""

from __future__ import annotations

from pathlib import Path

from runtime.bundle import Manifest
from runtime.errors import LladaVError

BACKENDS = ("tensorrt", "onnxruntime", "pytorch")


def make_runners(backend: str, bundle: Path, manifest: Manifest, model_dir=None, device: str = "cpu",
                 kv_cache: bool = True) -> dict:
    """{subgraph name: runner} for a backend; heavy imports happen here, lazily. kv_cache=False: the
    TensorRT backend allocates the full profile's buffers only (host backends allocate per run)."""
    if backend not in BACKENDS:
        raise LladaVError(f"backend: got {backend!r}; expected one of {BACKENDS}")
    from runtime.runners import OrtRunner, float_dtype, torch_runners

    fdt = float_dtype(manifest)
    if backend == "onnxruntime":
        return {n: OrtRunner(e, fdt, bundle, device) for n, e in manifest.subgraphs.items()}
    if backend == "tensorrt":
        from runtime.trt_runner import make_trt_runners

        return make_trt_runners(bundle, manifest, fdt, kv_cache=kv_cache)
    return torch_runners(manifest, fdt, model_dir)
