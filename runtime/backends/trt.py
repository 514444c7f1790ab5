"""The TensorRT backend: one owner of every device resource, engines as thin views over it.

`TrtBackend` owns, for a bundle, the CUDA stream, a pair of timing events per engine, the
engines and one device buffer per engine input and output and optimization profile (the decoders
have two: full sequences and cached steps, runtime.bundle), sized for that profile's largest
shapes. Everything is allocated when the first runner activates and freed when the last one
deactivates; nothing is allocated per generation or per step. Every copy and every engine
enqueue goes on the one stream, so decoder_post reads decoder_pre's hidden states after
decoder_pre wrote them by construction, and the host synchronises with the stream only before
it reads device results. Per-engine time comes from CUDA events around each enqueue (GPU time),
read after the step's results were synchronised.

Data that stays on the device between engines: decoder_pre's hidden states feed decoder_post
directly; the step-1 gather of kept rows writes into decoder_post's own hidden_states buffer;
the reduced inputs of later steps are staged once into decoder_pre's input buffers, and each
step rewrites only the response rows there.

The KV cache (docs/caching.md) stays on the device as well: a refresh's present K/V stay in the
full profile's output buffers; the rows a cached step attends to are gathered from there into the
cached profile's past K/V input buffers (one strided copy per run of rows, cudaMemcpy2DAsync)
once per refresh, and every cached step of that refresh reads them in place.

CUDA calls go through `runtime.backends.cuda.CudaApi`; engine calls through `TrtEngine` (TensorRT 10
Python API: deserialize_cuda_engine, create_execution_context, set_input_shape,
set_tensor_address, execute_async_v3). Tests substitute both (tests/cuda_doubles.py) to check
the order, streams and lifetimes of the device work; they do not run TensorRT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from runtime.bundle import CACHED_PROFILE, FULL_PROFILE, Bundle, Manifest, SubgraphEntry, device_engine, engine_problem
from runtime.backends.cuda import CudaApi, CudaError, DeviceTensor
from runtime.errors import LladaVError, expect
from runtime.backends.base import Runner


def row_runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """(source row, destination row, count) for each run of consecutive ascending rows."""
    starts = np.flatnonzero(np.diff(rows, prepend=-2) != 1)
    ends = np.append(starts[1:], rows.size)
    return [(int(rows[s]), int(s), int(e - s)) for s, e in zip(starts, ends)]


def engine_path(bundle: Path, entry: SubgraphEntry) -> Path:
    """The engine the manifest records, or the one jetson/build_engines.sh wrote on this device."""
    return bundle / (entry.engine.path if entry.engine else device_engine(entry.name))


class TrtEngine:
    """One engine file and its execution context (TensorRT 10 Python API)."""

    def __init__(self, name: str, path: Path):
        import tensorrt as trt

        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))  # kept alive as long as the engine
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise LladaVError(f"{name}: {path.name} could not be deserialized (corrupt, or built for another GPU "
                              "or TensorRT version: rebuild it on this device)")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise LladaVError(f"{name}: TensorRT could not create an execution context (out of device memory?)")
        # engines are built with DETAILED profiling verbosity for jetson/latency.py; its NVTX ranges would
        # cost every enqueue here (TensorRT's nvtx_verbosity docstring)
        self.context.nvtx_verbosity = trt.ProfilingVerbosity.LAYER_NAMES_ONLY
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def is_input(self, name: str) -> bool:
        return self.engine.get_tensor_mode(name) == self.trt.TensorIOMode.INPUT

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))

    @property
    def num_profiles(self) -> int:
        return int(self.engine.num_optimization_profiles)

    def set_profile(self, index: int, stream: int) -> bool:
        """Switch the context's optimization profile (its work is enqueued on `stream`); input shapes
        must be set again after it."""
        try:  # the Python binding raises RuntimeError instead of returning false (pyCore.cpp, release/10.3)
            return bool(self.context.set_optimization_profile_async(index, stream))
        except RuntimeError:
            return False

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        return bool(self.context.set_input_shape(name, tuple(shape)))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.context.get_tensor_shape(name))

    def set_address(self, name: str, ptr: int) -> bool:
        return bool(self.context.set_tensor_address(name, ptr))

    def enqueue(self, stream: int) -> bool:
        return bool(self.context.execute_async_v3(stream))

    def close(self) -> None:
        self.context = self.engine = self.runtime = None  # context before engine before runtime


class TrtBackend:
    """Every device resource of the TensorRT backend, with one lifecycle (see the module docstring)."""

    def __init__(self, bundle: Bundle, cuda_factory: Callable[[], CudaApi] | None = None,
                 engine_factory: Callable[[str, Path], TrtEngine] = TrtEngine, kv_cache: bool = True):
        """kv_cache=False: only the full profile's buffers are allocated (no cached steps)."""
        self.root, self.entries, self.float_dtype = bundle.root, bundle.manifest.subgraphs, bundle.float_dtype
        self.kv_cache = kv_cache
        self.cuda_factory = cuda_factory or _cuda_runtime
        self.engine_factory = engine_factory
        self.users = 0
        self._reset()

    def _reset(self) -> None:
        self.cuda: CudaApi | None = None
        self.stream: int | None = None
        self.engines: dict[str, TrtEngine] = {}
        self.profiles: dict[str, int] = {}  # each engine's active optimization profile
        self.buffers: dict[tuple[str, int, str], DeviceTensor] = {}  # (engine, profile, tensor)
        self.events: dict[str, tuple[int, int]] = {}
        self.timed: set[str] = set()

    # ------------------------------------------------------------ lifecycle

    def acquire(self) -> None:
        if self.users == 0:
            self._activate()
        self.users += 1

    def release(self) -> None:
        assert self.users > 0, "release() without acquire()"
        self.users -= 1
        if self.users == 0:
            self._deactivate()

    def _activate(self) -> None:
        try:
            self.cuda = self.cuda_factory()
            self.stream = self.cuda.stream_create()
            for name, entry in self.entries.items():
                self.engines[name] = engine = self.engine_factory(name, engine_path(self.root, entry))
                self._check_io(entry, engine)
                self._allocate(entry, engine)
                self.events[name] = (self.cuda.event_create(), self.cuda.event_create())
        except BaseException:
            self._deactivate()
            raise

    def _check_io(self, entry: SubgraphEntry, engine: TrtEngine) -> None:
        expect(engine.num_profiles == len(entry.shapes),
               f"{entry.name}: the engine has {engine.num_profiles} optimization profile(s); the bundle's graph has "
               f"{len(entry.shapes)} (an engine from another bundle: rebuild it with jetson/build_engines.sh)")
        want = [t.name for t in (*entry.inputs, *entry.outputs)]
        expect(sorted(engine.names) == sorted(want),
               f"{entry.name}: the engine's tensors are {sorted(engine.names)}; the bundle's graph has {sorted(want)} "
               "(an engine from another bundle: rebuild it with jetson/build_engines.sh)")
        for t in (*entry.inputs, *entry.outputs):
            dtype = self.float_dtype if t.dtype == "float" else np.dtype(t.dtype)
            expect(engine.dtype(t.name) == dtype,
                   f"{entry.name}: the engine's '{t.name}' is {engine.dtype(t.name)}; the bundle expects {dtype}")

    def _allocate(self, entry: SubgraphEntry, engine: TrtEngine) -> None:
        """One buffer per tensor and profile at that profile's largest shapes (outputs: as the engine
        infers them); the engine is left on its full profile."""
        for profile in reversed(range(len(entry.shapes) if self.kv_cache else 1)):
            self._select(entry.name, engine, profile, force=True)
            for t in entry.inputs:
                self._set_shape(entry.name, engine, t.name, tuple(entry.shapes[profile][t.name]["max"]), profile)
            for t in (*entry.inputs, *entry.outputs):
                shape, dtype = engine.shape(t.name), engine.dtype(t.name)
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                # at least one byte: an empty tensor (no cached rows) still gets a valid address
                self.buffers[entry.name, profile, t.name] = DeviceTensor(self.cuda.malloc(max(nbytes, 1)), shape, dtype)

    def _select(self, name: str, engine: TrtEngine, profile: int, force: bool = False) -> None:
        if force or self.profiles.get(name) != profile:
            expect(engine.set_profile(profile, self.stream),
                   f"{name}: TensorRT could not switch the engine to optimization profile {profile}")
            self.profiles[name] = profile

    def _deactivate(self) -> None:
        """Free whatever was allocated, also after a failed activation; then forget it all (also when a
        CUDA call fails here: after a device fault the process cannot reuse these handles anyway).
        Order: wait for the stream (work queued before an error may still use the contexts and the
        buffers), destroy the execution contexts, free buffers, events and the stream. A failed wait
        does not stop the rest; it is raised at the end."""
        cuda, failed = self.cuda, None
        try:
            if cuda is not None and self.stream is not None:
                try:
                    cuda.stream_synchronize(self.stream)
                except CudaError as exc:
                    failed = exc
            for engine in self.engines.values():
                engine.close()  # TensorRT releases its context memory before the buffers it pointed at go
            if cuda is not None:
                for buf in self.buffers.values():
                    cuda.free(buf.ptr)
                for pair in self.events.values():
                    for event in pair:
                        cuda.event_destroy(event)
                if self.stream is not None:
                    cuda.stream_destroy(self.stream)
        finally:
            self._reset()
        if failed is not None:
            raise failed

    # ------------------------------------------------------------ device work, all on self.stream

    def run(self, name: str, feeds: dict, keep_on_device: bool, profile: int = FULL_PROFILE) -> dict:
        """Bind inputs (host feeds are copied into this engine's buffers of `profile`), enqueue between
        the timing events, and return device views of the outputs, or host copies once the stream is done."""
        entry, engine = self.entries[name], self.engines[name]
        expect((name, profile, entry.inputs[0].name) in self.buffers,
               f"{name}: optimization profile {profile} has no buffers (the backend was opened without the KV cache)")
        self._select(name, engine, profile)
        for t in entry.inputs:
            x = feeds[t.name]
            ptr = x.ptr if isinstance(x, DeviceTensor) else self._upload(self.buffers[name, profile, t.name], x)
            self._set_shape(name, engine, t.name, tuple(x.shape), profile)
            expect(engine.set_address(t.name, ptr), f"{name}: TensorRT refused the address of input '{t.name}'")
        outputs = {}
        for t in entry.outputs:
            buf = self.buffers[name, profile, t.name]
            expect(engine.set_address(t.name, buf.ptr), f"{name}: TensorRT refused the address of output '{t.name}'")
            outputs[t.name] = DeviceTensor(buf.ptr, engine.shape(t.name), buf.dtype)
        start, end = self.events[name]
        self.cuda.event_record(start, self.stream)
        expect(engine.enqueue(self.stream), f"{name}: TensorRT could not enqueue the engine (execute_async_v3)")
        self.cuda.event_record(end, self.stream)
        self.timed.add(name)
        return outputs if keep_on_device else self.to_host(outputs)

    def _set_shape(self, name: str, engine: TrtEngine, tensor: str, shape: tuple, profile: int) -> None:
        bounds = self.entries[name].shapes[profile][tensor]
        expect(engine.set_input_shape(tensor, shape),
               f"{name}: the engine refused shape {shape} for input '{tensor}'; the bundle's profile {profile} allows "
               f"{tuple(bounds['min'])} to {tuple(bounds['max'])} "
               "(an engine built for another profile: rebuild it with jetson/build_engines.sh)")

    def _upload(self, buf: DeviceTensor, x: np.ndarray, offset: int = 0) -> int:
        host = np.ascontiguousarray(x, dtype=buf.dtype)
        assert offset + host.nbytes <= buf.nbytes, "upload larger than its buffer (profile checks come first)"
        self.cuda.copy_htod(buf.ptr + offset, host, self.stream)
        return buf.ptr

    def to_host(self, outputs: dict) -> dict:
        """Host copies of device tensors: every copy enqueued, then one wait for the stream."""
        host = {}
        for n, x in outputs.items():
            host[n] = np.empty(x.shape, x.dtype)
            self.cuda.copy_dtoh(host[n], x.ptr, self.stream)
        self.cuda.stream_synchronize(self.stream)
        return host

    def stage(self, name: str, tensor: str, x: np.ndarray) -> DeviceTensor:
        """x uploaded into engine `name`'s (full profile) buffer for input `tensor`; later runs take it as a feed."""
        buf = self.buffers[name, FULL_PROFILE, tensor]
        self._upload(buf, x)
        return DeviceTensor(buf.ptr, tuple(x.shape), buf.dtype)

    def write_rows(self, staged: DeviceTensor, start: int, rows: np.ndarray) -> None:
        """staged[b, start:start + len(rows)] = rows for each batch entry: G rows uploaded, not n'."""
        batch, n = staged.shape[:2]
        assert 0 <= start and start + rows.shape[0] <= n, "rows outside the staged tensor"
        host = np.ascontiguousarray(rows, dtype=staged.dtype)
        row_bytes = host.nbytes // host.shape[0]
        for b in range(batch):
            self.cuda.copy_htod(staged.ptr + (b * n + start) * row_bytes, host, self.stream)

    def gather_rows(self, x: DeviceTensor, rows: np.ndarray, name: str, tensor: str) -> DeviceTensor:
        """x[:, rows] into engine `name`'s (full profile) buffer for input `tensor`: one device copy per run of rows."""
        buf = self.buffers[name, FULL_PROFILE, tensor]
        batch, n = x.shape[:2]
        out = DeviceTensor(buf.ptr, (batch, rows.size, *x.shape[2:]), x.dtype)
        assert out.dtype == buf.dtype and out.nbytes <= buf.nbytes, "gather larger than its buffer"
        row_bytes = int(np.prod(x.shape[2:], dtype=np.int64)) * x.dtype.itemsize
        for b in range(batch):
            for src, dst, count in row_runs(rows):
                self.cuda.copy_dtod(out.ptr + (b * rows.size + dst) * row_bytes, x.ptr + (b * n + src) * row_bytes,
                                    count * row_bytes, self.stream)
        return out

    def gather_past(self, x: DeviceTensor, rows: np.ndarray, name: str, tensor: str) -> DeviceTensor:
        """x[:, :, :, rows] of a (layers, batch, heads, rows, head dim) K/V tensor into engine `name`'s
        cached-profile buffer for input `tensor`: one strided copy (cudaMemcpy2DAsync) per run of rows,
        each moving that run of every layer, batch entry and head."""
        buf = self.buffers[name, CACHED_PROFILE, tensor]
        lead, n, dh = int(np.prod(x.shape[:3], dtype=np.int64)), x.shape[3], x.shape[4]
        out = DeviceTensor(buf.ptr, (*x.shape[:3], rows.size, dh), x.dtype)
        assert out.dtype == buf.dtype and out.nbytes <= buf.nbytes, "gather larger than its buffer"
        row_bytes = dh * x.dtype.itemsize
        for src, dst, count in row_runs(rows):
            self.cuda.copy_2d_dtod(out.ptr + dst * row_bytes, rows.size * row_bytes, x.ptr + src * row_bytes,
                                   n * row_bytes, count * row_bytes, lead, self.stream)
        return out

    def elapsed_ms(self, name: str) -> float:
        """GPU time of engine `name`'s last run (waits for its end event)."""
        if name not in self.timed:
            return 0.0
        start, end = self.events[name]
        self.cuda.event_synchronize(end)
        return self.cuda.event_elapsed_ms(start, end)


def _cuda_runtime() -> CudaApi:
    from runtime.backends.cuda import CudaRuntime

    return CudaRuntime()


class TrtRunner(Runner):
    """The runner contract for one engine of a shared `TrtBackend`."""

    def __init__(self, entry: SubgraphEntry, backend: TrtBackend):
        super().__init__(entry, backend.float_dtype)
        self.backend = backend

    def _activate(self):
        self.backend.acquire()

    def _deactivate(self):
        self.backend.release()

    def _infer(self, feeds, keep_on_device, profile):
        return self.backend.run(self.name, feeds, keep_on_device, profile)

    def last_ms(self) -> float:
        return self.backend.elapsed_ms(self.name)

    def describe(self, x):
        return (x.dtype, x.shape) if isinstance(x, DeviceTensor) else super().describe(x)

    def to_host(self, x):
        return self.backend.to_host({"x": x})["x"] if isinstance(x, DeviceTensor) else x

    def stage(self, tensor: str, x: np.ndarray):
        return self.backend.stage(self.name, tensor, x)

    def write_rows(self, staged, start: int, rows: np.ndarray) -> None:
        self.backend.write_rows(staged, start, rows)

    def take_rows(self, x, rows: np.ndarray, tensor: str):
        return self.backend.gather_rows(x, rows, self.name, tensor)

    def gather_past(self, x, rows: np.ndarray, tensor: str):
        return self.backend.gather_past(x, rows, self.name, tensor)


def check_engines(bundle: Path, manifest: Manifest, tensorrt_version: str) -> None:
    """Every engine present, and built from this bundle's graphs, profiles and settings with this
    TensorRT: a missing, stale or unexplained engine is an error before anything runs."""
    rebuild = f"build the engines on this device with bash {Path(bundle) / manifest.tensorrt['script']}"
    for name, entry in manifest.subgraphs.items():
        path = engine_path(bundle, entry)
        expect(path.is_file(), f"backend tensorrt: {path} is missing; {rebuild}")
        problem = engine_problem(bundle, manifest, name, tensorrt_version)
        expect(problem is None, f"backend tensorrt: {path} is {problem}; {rebuild}")


def make_trt_runners(bundle: Bundle, cuda_factory=None, engine_factory=None, kv_cache: bool = True) -> dict:
    """{subgraph: TrtRunner} sharing one backend. The factories default to CUDA and TensorRT."""
    if engine_factory is None:
        try:
            import tensorrt
        except ImportError:
            raise LladaVError("backend tensorrt: the TensorRT Python package is not installed "
                              "(on the Jetson it comes with JetPack); use --backend onnxruntime") from None
        engine_factory = TrtEngine
        check_engines(bundle.root, bundle.manifest, tensorrt.__version__)
    backend = TrtBackend(bundle, cuda_factory, engine_factory, kv_cache)
    return {name: TrtRunner(entry, backend) for name, entry in bundle.manifest.subgraphs.items()}
