"""The backend registry: `make_runners(backend, bundle)` -> {subgraph name: runner} (the contract
of runtime.backends.base.Runner). Each backend lives in its own module, imported only when it is
asked for: ONNX Runtime (runtime.backends.ort), TensorRT (runtime.backends.trt), and plugins
registered under the `lladav_edge.backends` entry point: the workstation's PyTorch backend
(export.torch_backend), which the car's runtime never imports by name."""

from __future__ import annotations

from runtime.errors import LladaVError

BACKENDS = ("tensorrt", "onnxruntime", "pytorch")  # pytorch: a plugin (PLUGINS)
PLUGINS = "lladav_edge.backends"  # entry-point group: name -> factory(bundle, model_dir=, device=)


def make_runners(backend: str, bundle, model_dir=None, device: str = "cpu", kv_cache: bool = True) -> dict:
    """{subgraph name: runner} for a backend over an opened bundle (runtime.bundle.Bundle); heavy
    imports happen here, lazily. kv_cache=False: the TensorRT backend allocates the full profile's
    buffers only (host backends allocate per run)."""
    if backend not in BACKENDS:
        raise LladaVError(f"backend: got {backend!r}; expected one of {BACKENDS}")
    if backend == "onnxruntime":
        from runtime.backends.ort import OrtRunner

        return {n: OrtRunner(e, bundle, device) for n, e in bundle.manifest.subgraphs.items()}
    if backend == "tensorrt":
        from runtime.backends.trt import make_trt_runners

        return make_trt_runners(bundle, kv_cache=kv_cache)
    return plugin(backend)(bundle, model_dir=model_dir, device=device)


def plugin(name: str):
    """The factory a plugin backend registered under PLUGINS."""
    from importlib.metadata import entry_points

    found = [e for e in entry_points(group=PLUGINS) if e.name == name]
    if not found:
        raise LladaVError(f"backend {name}: no plugin registered under the entry point group {PLUGINS!r} (the "
                          "project's installation is incomplete: reinstall it with pip install -e .)")
    try:
        return found[0].load()
    except ImportError as exc:
        raise LladaVError(f"backend {name}: needs the workstation install (pip install -e \".[export]\"): {exc}") from None
