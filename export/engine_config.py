"""How an engine is built: one dataclass drives both the Python builder (export/trt_build.py) and
the trtexec command in the bundle's jetson/build_engines.sh, so the two cannot drift.

TensorRT 10.3 facts (trtexec `samples/common/sampleOptions.cpp`, `sampleEngines.cpp`):
`--noTF32` clears `BuilderFlag.TF32`, and is accepted with `--stronglyTyped` (only the fp16/bf16/
int8/fp8/int4 precision flags are refused there); `--memPoolSize=workspace:NM` sets
`MemoryPoolType.WORKSPACE` in MiB; `--builderOptimizationLevel` sets
`builder_optimization_level`; `--stronglyTyped` creates the network with
`NetworkDefinitionCreationFlag.STRONGLY_TYPED`; `--profilingVerbosity=layer_names_only|detailed|none`
sets `profiling_verbosity` (`ProfilingVerbosity.LAYER_NAMES_ONLY`, `DETAILED`, `NONE`).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass


PROFILING_VERBOSITY = {"layer_names_only": "LAYER_NAMES_ONLY", "detailed": "DETAILED", "none": "NONE"}  # trtexec -> enum


@dataclass(frozen=True)
class EngineBuildSettings:
    # fp16 graphs carry their precisions (fp16 weights, float32 islands by Casts), and quantized ones their
    # Q/DQ (TensorRT: "use explicit quantization with strong typing"): both build strongly typed
    precision: str
    workspace_mib: int = 4096
    opt_level: int = 3
    # TensorRT runs fp32 MatMuls and convolutions in TF32 on Ampere (Orin) unless told otherwise
    # (BuilderFlag.kTF32, NvInfer.h): that matters to fp32 bundles, and to the similarity graph of every bundle
    # (its cosines are a float32 MatMul; TF32's 10-bit mantissa would reorder near-equal similarities). The
    # decoders of fp16 and quantized bundles have no fp32 MatMul or Conv (their float32 islands are norms,
    # softmax and casts).
    tf32: bool = False
    # layer names and details in trtexec's --exportProfile / --exportLayerInfo (jetson/latency.py); the
    # runtime lowers its context's NVTX verbosity, since DETAILED adds NVTX work to every enqueue
    profiling_verbosity: str = "detailed"

    @property
    def strongly_typed(self) -> bool:
        return self.precision != "fp32"

    def trtexec_flags(self) -> list[str]:
        flags = ["--stronglyTyped"] if self.strongly_typed else []
        flags += [] if self.tf32 else ["--noTF32"]
        return flags + [f"--memPoolSize=workspace:{self.workspace_mib}M",
                        f"--builderOptimizationLevel={self.opt_level}",
                        f"--profilingVerbosity={self.profiling_verbosity}"]

    def network_flags(self, trt) -> int:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if self.strongly_typed else 0

    def configure(self, trt, config) -> None:
        """The same settings on a TensorRT IBuilderConfig."""
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_mib << 20)
        config.builder_optimization_level = self.opt_level
        if not self.tf32:
            config.clear_flag(trt.BuilderFlag.TF32)
        config.profiling_verbosity = getattr(trt.ProfilingVerbosity, PROFILING_VERBOSITY[self.profiling_verbosity])

    def to_dict(self) -> dict:
        return asdict(self)


def trtexec_command(onnx: str, engine: str, shapes: list[dict], settings: EngineBuildSettings, timing_cache: str,
                    trtexec: str = "$TRTEXEC") -> list[str]:
    """The trtexec invocation that builds one engine from its ONNX file and profiles: with several,
    each set of shapes follows its `--profile=i` (trtexec 10.0 and newer, samples/common/sampleOptions.cpp)."""
    profiles = []
    for i, profile_shapes in enumerate(shapes):
        def spec(which):
            return ",".join(f"{name}:{'x'.join(map(str, s[which]))}" for name, s in profile_shapes.items())

        profiles += [f"--profile={i}"] if len(shapes) > 1 else []
        profiles += [f"--minShapes={spec('min')}", f"--optShapes={spec('opt')}", f"--maxShapes={spec('max')}"]
    return [trtexec, f"--onnx={onnx}", f"--saveEngine={engine}", *settings.trtexec_flags(), *profiles,
            f"--timingCacheFile={timing_cache}", "--skipInference"]


def build_script(commands: dict[str, list[str]], provenance: dict[str, dict]) -> str:
    """A bash script for the Jetson: each engine built under a temporary name, then renamed, and
    beside it `<engine>.json`, what it was built from (runtime.bundle.engine_provenance) and with
    which TensorRT: a later rebuild of the bundle or the runtime can tell a stale engine."""
    lines = [
        "#!/usr/bin/env bash",
        "# Build this bundle's TensorRT engines ON THE TARGET: engines are tied to the GPU and the",
        "# TensorRT version (JetPack 6: TensorRT 10.3). Before timing: sudo nvpmodel -m 0; sudo jetson_clocks",
        "set -euo pipefail",
        'cd "$(dirname "$0")/.."',
        'TRTEXEC="${TRTEXEC:-/usr/src/tensorrt/bin/trtexec}"',
        "TRT_VERSION=\"$(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || echo unknown)\"",
        "mkdir -p engines",
    ]
    for name, cmd in commands.items():
        final = next(a.split("=", 1)[1] for a in cmd if a.startswith("--saveEngine="))
        tmp_cmd = [a if not a.startswith("--saveEngine=") else f"--saveEngine={final}.tmp" for a in cmd]
        record = json.dumps({**provenance[name], "tensorrt": "@TRT_VERSION@"}, sort_keys=True)
        lines += ["", f'echo "building {name} ..."',
                  " \\\n    ".join(a if a == "$TRTEXEC" else shlex.quote(a) for a in tmp_cmd).replace(
                      "$TRTEXEC", '"$TRTEXEC"'),
                  f"echo {shlex.quote(record)} | sed \"s/@TRT_VERSION@/$TRT_VERSION/\" > {shlex.quote(final + '.json.tmp')}",
                  f"mv {shlex.quote(final + '.tmp')} {shlex.quote(final)}",
                  f"mv {shlex.quote(final + '.json.tmp')} {shlex.quote(final + '.json')}"]
    lines += ["", 'echo "engines built in $(pwd)/engines"', ""]
    return "\n".join(lines)
