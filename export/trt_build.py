"""TensorRT engines from the bundle's ONNX files, where TensorRT and a GPU are present.

Written against the TensorRT 10 Python API (10.3 on JetPack 6, and newer): parse_from_file so
external weights resolve, the manifest's optimization profiles (in order), a timing cache reused
across builds, and every other setting from `EngineBuildSettings` (the same source as the
trtexec command: strongly typed for fp16, TF32 off, workspace, optimization level). Each engine
is then compared with ONNX Runtime through Polygraphy. TensorRT is imported lazily: nothing here
runs, and nothing is reported, where it is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

from export.engine_config import EngineBuildSettings
from runtime.errors import LladaVError


class EngineBuildError(LladaVError):
    pass


def tensorrt_status() -> tuple[bool, str, str | None]:
    """(usable, why, version): whether engines can be built on this host."""
    try:
        import tensorrt as trt
    except ImportError:
        return False, "the TensorRT Python package is not installed (on the Jetson it comes with JetPack)", None
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception as exc:  # TensorRT raises plain exceptions when CUDA cannot initialise
        return False, f"TensorRT {trt.__version__} is installed but no usable GPU was found ({exc})", trt.__version__
    if builder is None:
        return False, f"TensorRT {trt.__version__} is installed but could not create a builder (no GPU?)", trt.__version__
    return True, f"TensorRT {trt.__version__}", trt.__version__


def build_engine(onnx_path: Path, engine_path: Path, shapes: list[dict], settings: EngineBuildSettings,
                 timing_cache: Path) -> None:
    """Parse, configure the profiles (index i = shapes[i]), build, and write engine and timing cache atomically."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(settings.network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    settings.configure(trt, config)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    # setTimingCache returns false when the cache was recorded on another device (NvInfer.h, release/10.3,
    # IBuilderConfig::setTimingCache): refuse it here, before minutes of building (docs/tensorrt.md)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise EngineBuildError(f"timing cache {timing_cache}: recorded on another GPU or TensorRT version; delete "
                               "it (the next build writes a new one) or build on the device that recorded it")
    for profile_shapes in shapes:
        profile = builder.create_optimization_profile()
        for name, s in profile_shapes.items():
            profile.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise EngineBuildError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log above)")
    _write_atomic(engine_path, bytes(blob))
    _write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))


def check_engine(engine_path: Path, onnx_path: Path, feeds_by_profile: list[list[dict]], name: str,
                 tolerances: dict) -> dict:
    """TensorRT vs ONNX Runtime on the same feeds, each list under its optimization profile, with the
    bundle entry's tolerances per output (the ones the car checks with). Returns {feed index: {output:
    check}}, indices counted across profiles."""
    from runtime.checks import compare_engine

    return compare_engine(engine_path, onnx_path, feeds_by_profile, {o: tuple(v) for o, v in tolerances.items()}, name)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
