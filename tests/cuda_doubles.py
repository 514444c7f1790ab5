"""Test doubles for the TensorRT backend's device work. Nothing here runs TensorRT or a GPU, and
no test that uses them claims it did: they check the order, streams and lifetimes of what the
backend asks of CUDA and of its engines.

SimulatedCuda    CUDA's stream semantics over host memory (docs/cuda.md). Device allocations
                 are host buffers; work issued on a stream is queued and runs only when the host
                 synchronises with that stream or one of its events; a device-to-host copy leaves
                 its destination poisoned (all bits set: NaN for floats) until then. It raises
                 HazardError where the result would depend on timing: work on one stream
                 touching memory that unsynchronised work on another stream writes (or reads,
                 when the new work writes), a copy outside a live allocation, freeing memory that
                 queued work still uses, the elapsed time of events that have not completed.
SimulatedEngine  takes profiles, shapes and addresses like a TensorRT execution context (refusing
                 shapes outside its active optimization profile, and forgetting them when the
                 profile changes, as TensorRT does); its enqueued work, when it runs, records
                 the inputs it read and fills every output row with a stamp (its run count and
                 the row index), never with model outputs.
OrtEngine        a SimulatedEngine whose work, when it runs, computes its outputs with ONNX
                 Runtime from the inputs it read in simulated device memory: the backend's data
                 movement (staging, gathers, profiles, the KV cache's strided copies) checked
                 against the ONNX Runtime backend's tokens. It is not TensorRT.
Recorder, RecordedEngine  log every call of any CudaApi / engine in order: over the simulation
                 here, over libcudart and real engines in tests/gpu.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from runtime.bundle import Manifest, SubgraphEntry, resolve_dims


class HazardError(AssertionError):
    """Device work whose result is not guaranteed by the order the host asked for."""


Range = tuple[int, int]  # (device pointer, bytes)


@dataclass
class Work:
    stream: int
    what: str
    reads: list[Range]
    writes: list[Range]
    run: Callable[[], None]
    advances_clock: bool = True
    marker: int | None = None  # the event an event-record work completes


def _overlap(a: Range, b: Range) -> bool:
    return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


class SimulatedCuda:
    """`CudaApi` over host memory, with the semantics and hazard checks described above."""

    def __init__(self):
        self.memory: dict[int, np.ndarray] = {}  # live allocations: base pointer -> bytes
        self.queues: dict[int, list[Work]] = {}  # stream -> work issued, not yet run
        self.events: dict[int, dict] = {}
        self.clock = 0  # "milliseconds": every work that runs (but event markers) advances it by 1
        self._handles = 0x7000

    def _handle(self) -> int:
        self._handles += 16
        return self._handles

    # memory
    def malloc(self, nbytes: int) -> int:
        buf = np.zeros(max(nbytes, 1), np.uint8)
        self.memory[buf.ctypes.data] = buf
        return buf.ctypes.data

    def free(self, ptr: int) -> None:
        if ptr not in self.memory:
            raise HazardError(f"free of {ptr:#x}: not a live allocation")
        whole = (ptr, self.memory[ptr].size)
        for work in (w for q in self.queues.values() for w in q):
            if any(_overlap(whole, r) for r in (*work.reads, *work.writes)):
                raise HazardError(f"free of {ptr:#x} while queued work uses it ({work.what})")
        del self.memory[ptr]

    def view(self, ptr: int, nbytes: int) -> np.ndarray:
        """The bytes [ptr, ptr + nbytes) of one live allocation."""
        for base, buf in self.memory.items():
            if base <= ptr and ptr + nbytes <= base + buf.size:
                return buf[ptr - base : ptr - base + nbytes]
        raise HazardError(f"device range {ptr:#x}+{nbytes} is not inside one live allocation")

    # streams and events
    def stream_create(self) -> int:
        stream = self._handle()
        self.queues[stream] = []
        return stream

    def stream_destroy(self, stream: int) -> None:
        self.stream_synchronize(stream)  # CUDA finishes the stream's work first
        del self.queues[stream]

    def stream_synchronize(self, stream: int) -> None:
        self._run(stream, len(self.queues[stream]))

    def event_create(self) -> int:
        event = self._handle()
        self.events[event] = {"state": "created"}
        return event

    def event_destroy(self, event: int) -> None:
        del self.events[event]

    def event_record(self, event: int, stream: int) -> None:
        state = self.events[event]
        state.update(state="recorded", stream=stream)

        def mark():
            state.update(state="done", time=self.clock)

        self._issue(Work(stream, f"event {event:#x}", [], [], mark, advances_clock=False, marker=event))

    def event_synchronize(self, event: int) -> None:
        state = self.events[event]
        if state["state"] == "recorded":
            queue = self.queues[state["stream"]]
            self._run(state["stream"], next(i for i, w in enumerate(queue) if w.marker == event) + 1)

    def event_elapsed_ms(self, start: int, end: int) -> float:
        a, b = self.events[start], self.events[end]
        if a["state"] != "done" or b["state"] != "done":
            raise HazardError("elapsed time of events that have not completed (cudaErrorNotReady)")
        return float(b["time"] - a["time"])

    # copies
    def copy_htod(self, dst: int, src: np.ndarray, stream: int) -> None:
        data = np.frombuffer(np.ascontiguousarray(src).tobytes(), np.uint8)  # pageable: staged at the call
        self.view(dst, data.size)

        def run():
            self.view(dst, data.size)[:] = data

        self._issue(Work(stream, "copy_htod", [], [(dst, data.size)], run))

    def copy_dtoh(self, dst: np.ndarray, src: int, stream: int) -> None:
        out = dst.reshape(-1).view(np.uint8)
        self.view(src, out.size)
        out[:] = 0xFF  # not there until the host synchronises

        def run():
            out[:] = self.view(src, out.size)

        self._issue(Work(stream, "copy_dtoh", [(src, out.size)], [], run))

    def copy_dtod(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self.view(dst, nbytes), self.view(src, nbytes)

        def run():
            self.view(dst, nbytes)[:] = self.view(src, nbytes).copy()

        self._issue(Work(stream, "copy_dtod", [(src, nbytes)], [(dst, nbytes)], run))

    def copy_2d_dtod(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int,
                     stream: int) -> None:
        if width > dst_pitch or width > src_pitch:
            raise HazardError(f"copy_2d_dtod: width {width} exceeds a pitch ({dst_pitch}, {src_pitch}): cudaErrorInvalidValue")
        reads = [(src + i * src_pitch, width) for i in range(height)]
        writes = [(dst + i * dst_pitch, width) for i in range(height)]
        if any(_overlap(r, w) for r in reads for w in writes):
            raise HazardError("copy_2d_dtod: source and destination overlap (CUDA: undefined)")
        for ptr, nbytes in (*reads, *writes):
            self.view(ptr, nbytes)

        def run():
            for (s, n), (d, _) in zip(reads, writes):
                self.view(d, n)[:] = self.view(s, n).copy()

        self._issue(Work(stream, "copy_2d_dtod", reads, writes, run))

    # the model of ordering
    def issue(self, work: Work) -> None:
        """Queue device work (also the engines'), after checking it against other streams' queued work."""
        self._issue(work)

    def _issue(self, work: Work) -> None:
        for stream, queue in self.queues.items():
            if stream == work.stream:
                continue
            for other in queue:
                clash = any(_overlap(w, r) for w in work.writes for r in (*other.reads, *other.writes)) or any(
                    _overlap(r, w) for r in work.reads for w in other.writes)
                if clash:
                    raise HazardError(f"{work.what} on stream {work.stream:#x} races with {other.what} queued on "
                                      f"stream {stream:#x}: nothing orders them")
        self.queues[work.stream].append(work)

    def _run(self, stream: int, count: int) -> None:
        queue = self.queues[stream]
        for work in queue[:count]:
            work.run()
            self.clock += work.advances_clock
        del queue[:count]

    def pending(self) -> int:
        return sum(len(q) for q in self.queues.values())


class SimulatedEngine:
    """An engine stand-in for one subgraph (see the module docstring). `profiles` overrides the
    manifest's min/max per input and profile, as if the engine had been built for other profiles."""

    def __init__(self, manifest: Manifest, name: str, float_dtype: np.dtype, cuda: SimulatedCuda, profiles: list | None = None,
                 entry: SubgraphEntry | None = None):
        self.entry = entry or manifest.subgraphs[name]
        self.float_dtype, self.cuda = np.dtype(float_dtype), cuda
        self.model_dims = manifest.model_dims()
        entry = self.entry
        self.profiles = profiles or entry.shapes
        self.active = 0
        self.tensors = {t.name: t for t in (*entry.inputs, *entry.outputs)}
        self.names = list(self.tensors)
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.runs: list[dict[str, np.ndarray]] = []  # inputs each run read, in run order

    def is_input(self, name: str) -> bool:
        return any(t.name == name for t in self.entry.inputs)

    def dtype(self, name: str) -> np.dtype:
        t = self.tensors[name]
        return self.float_dtype if t.dtype == "float" else np.dtype(t.dtype)

    @property
    def num_profiles(self) -> int:
        return len(self.profiles)

    def set_profile(self, index: int, stream: int) -> bool:
        if not 0 <= index < len(self.profiles):
            return False
        self.active = index
        self.shapes.clear()  # TensorRT: switching invalidates the input shapes
        return True

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        lo, hi = self.profiles[self.active][name]["min"], self.profiles[self.active][name]["max"]
        if len(shape) != len(lo) or not all(a <= s <= b for s, a, b in zip(shape, lo, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def shape(self, name: str) -> tuple:
        if self.is_input(name):
            return self.shapes[name]
        sizes = dict(self.model_dims)
        for t in self.entry.inputs:
            sizes.update({d: s for d, s in zip(t.dims, self.shapes[t.name]) if isinstance(d, str)})
        return resolve_dims(self.tensors[name].dims, sizes)

    def set_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def _range(self, name: str) -> Range:
        return self.addresses[name], int(np.prod(self.shape(name), dtype=np.int64)) * self.dtype(name).itemsize

    def enqueue(self, stream: int) -> bool:
        if set(self.addresses) != set(self.names) or not all(t.name in self.shapes for t in self.entry.inputs):
            return False  # TensorRT refuses to enqueue with a tensor unbound
        inputs = {t.name: (self._range(t.name), self.shape(t.name), self.dtype(t.name)) for t in self.entry.inputs}
        outputs = {t.name: (self._range(t.name), self.shape(t.name), self.dtype(t.name)) for t in self.entry.outputs}

        def run():
            seen = {n: self.cuda.view(*r).copy().view(d).reshape(s) for n, (r, s, d) in inputs.items()}
            self.runs.append(seen)
            values = self.compute(seen, {name: (shape, dtype) for name, (_, shape, dtype) in outputs.items()})
            for name, ((ptr, nbytes), shape, dtype) in outputs.items():
                self.cuda.view(ptr, nbytes).view(dtype).reshape(shape)[:] = values[name]

        self.cuda.issue(Work(stream, f"enqueue {self.entry.name}", [r for r, _, _ in inputs.values()],
                             [r for r, _, _ in outputs.values()], run))
        return True

    def compute(self, seen: dict[str, np.ndarray], outputs: dict[str, tuple]) -> dict[str, np.ndarray]:
        """The outputs ({name: (shape, dtype)} as enqueued) of a run that read `seen`: stamps."""
        return {name: stamp(len(self.runs), shape, dtype) for name, (shape, dtype) in outputs.items()}

    def close(self) -> None:
        self.addresses.clear()


class OrtEngine(SimulatedEngine):
    """A SimulatedEngine that computes its outputs with an ONNX Runtime session of the bundle's graph."""

    def __init__(self, manifest: Manifest, name: str, float_dtype: np.dtype, cuda: SimulatedCuda, session):
        super().__init__(manifest, name, float_dtype, cuda)
        self.session = session

    def compute(self, seen: dict[str, np.ndarray], outputs: dict[str, tuple]) -> dict[str, np.ndarray]:
        got = dict(zip([o.name for o in self.session.get_outputs()], self.session.run(None, seen)))
        for name, (shape, _) in outputs.items():
            assert got[name].shape == shape, f"{name}: ONNX Runtime gave {got[name].shape}, the engine {shape}"
        return got


def stamp(run: int, shape: tuple, dtype) -> np.ndarray:
    """What a simulated engine writes: run * 1000 + a scramble of the row index (axis 1)."""
    value = np.full(shape, run * 1000.0)
    if len(shape) > 1:
        value += ((np.arange(shape[1]) * 37) % 101).reshape((1, -1) + (1,) * (len(shape) - 2))
    return value.astype(dtype)


@dataclass
class Call:
    op: str
    args: tuple
    result: object = None


def _summary(x):
    return ("host", x.nbytes) if isinstance(x, np.ndarray) else x


class Recorder:
    """Any CudaApi, with every call appended to `log` after it returned."""

    def __init__(self, inner, log: list[Call]):
        self.inner, self.log = inner, log

    def __getattr__(self, op):
        fn = getattr(self.inner, op)

        def call(*args):
            result = fn(*args)
            self.log.append(Call(op, tuple(_summary(a) for a in args), result))
            return result

        return call


@dataclass
class RecordedEngine:
    """Any engine, with shape, address, enqueue, profile and close calls appended to `log`."""

    inner: object
    name: str
    log: list[Call] = field(default_factory=list)

    def __getattr__(self, attr):
        return getattr(self.inner, attr)

    def set_input_shape(self, tensor, shape):
        ok = self.inner.set_input_shape(tensor, shape)
        self.log.append(Call("set_input_shape", (self.name, tensor, tuple(shape)), ok))
        return ok

    def set_address(self, tensor, ptr):
        ok = self.inner.set_address(tensor, ptr)
        self.log.append(Call("set_address", (self.name, tensor, ptr), ok))
        return ok

    def enqueue(self, stream):
        ok = self.inner.enqueue(stream)
        self.log.append(Call("enqueue", (self.name, stream), ok))
        return ok

    def set_profile(self, index, stream):
        ok = self.inner.set_profile(index, stream)
        self.log.append(Call("set_profile", (self.name, index, stream), ok))
        return ok

    def close(self):
        self.inner.close()
        self.log.append(Call("close", (self.name,), None))


STREAM_ARG = {"copy_htod": 2, "copy_dtoh": 2, "copy_dtod": 3, "copy_2d_dtod": 6, "event_record": 1,
              "stream_synchronize": 0, "enqueue": 1, "set_profile": 2}


def streams_used(log: list[Call]) -> set:
    """Every stream that a copy, an event record, a sync or an enqueue went on."""
    return {c.args[STREAM_ARG[c.op]] for c in log if c.op in STREAM_ARG}


def device_work(log: list[Call]) -> list[str]:
    """The log as the device sees it: copies, engine runs, event records and host waits."""
    shown = {"copy_htod", "copy_dtoh", "copy_dtod", "copy_2d_dtod", "event_record", "stream_synchronize",
             "event_synchronize"}
    return [f"enqueue {c.args[0]}" if c.op == "enqueue" else c.op for c in log if c.op in shown or c.op == "enqueue"]


def expected_device_work(copy_runs: int, later_steps: int, similarity: bool = True) -> list[str]:
    """`device_work` of one generation on the TensorRT backend: vision; step 1 (full-sequence
    decoder_pre, saliency to the host; with the duplicate rule the similarity engine on decoder_pre's
    hidden states where they are: only its visual rows and pivots uploaded, the similarities to the
    host, its GPU time; `copy_runs` device copies gathering the kept rows, the reduced inputs staged,
    decoder_post, logits to the host); then per later step one upload of
    the response rows, both engines, the logits. Each step ends with the trace reading both
    engines' GPU times; deactivation waits for the stream before freeing. The empty K/V inputs (no
    cached rows) are staged once before step 1."""
    run = lambda name: ["event_record", f"enqueue {name}", "event_record"]  # noqa: E731
    fetch = ["copy_dtoh", "stream_synchronize"]
    timed = ["event_synchronize", "event_synchronize"]
    vision = ["copy_htod", *run("vision"), *fetch, "event_synchronize"]
    rule = ["copy_htod"] * 2 + run("similarity") + fetch + ["event_synchronize"] if similarity else []
    step1 = (["copy_htod"] * 4 + ["copy_htod"] * 3 + run("decoder_pre") + fetch + rule + ["copy_dtod"] * copy_runs
             + ["copy_htod"] * 4 + run("decoder_post") + fetch + timed)
    later = ["copy_htod"] + run("decoder_pre") + run("decoder_post") + fetch + timed
    return vision + step1 + later * later_steps + ["stream_synchronize"]
