"""TensorRT runners: engines from the bundle, device buffers allocated once, hidden states on the GPU.

Written against the TensorRT 10 Python API (10.3 on JetPack 6): deserialize_cuda_engine,
create_execution_context, set_input_shape, set_tensor_address, execute_async_v3. Device memory
and copies go through Polygraphy's CUDA wrapper (already a dependency). Every buffer is
allocated once at the profile's largest shapes and reused by every step; an output can stay on
the device (`keep_on_device=True`) and be fed straight into the next engine. The step-1 gather
of kept rows is a device-to-device copy per run of consecutive rows.

Imported only when the tensorrt backend is chosen; nothing here runs without TensorRT and a GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.bundle import Manifest, SubgraphEntry
from runtime.errors import LladaVError
from runtime.runners import Runner


def numpy_dtype(dtype) -> np.dtype:
    """numpy dtype of a numpy dtype or of Polygraphy's DataType (what its device arrays report)."""
    if isinstance(dtype, np.dtype):
        return dtype
    try:
        return np.dtype(dtype)
    except TypeError:
        from polygraphy.datatype import DataType

        return np.dtype(DataType.to_dtype(dtype, "numpy"))


def row_runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """(source row, destination row, count) for each run of consecutive ascending rows."""
    starts = np.flatnonzero(np.diff(rows, prepend=-2) != 1)
    ends = np.append(starts[1:], rows.size)
    return [(int(rows[s]), int(s), int(e - s)) for s, e in zip(starts, ends)]


def make_trt_runners(bundle: Path, manifest: Manifest, fdt) -> dict:
    try:
        import tensorrt  # noqa: F401
        from polygraphy import cuda  # noqa: F401
    except ImportError:
        raise LladaVError("backend tensorrt: the TensorRT Python package is not installed "
                          "(on the Jetson it comes with JetPack); use --backend onnxruntime") from None
    return {name: TrtRunner(entry, fdt, engine_path(bundle, entry)) for name, entry in manifest.subgraphs.items()}


def engine_path(bundle: Path, entry: SubgraphEntry) -> Path:
    """The engine the manifest records, or the one jetson/build_engines.sh wrote on this device."""
    path = bundle / (entry.engine.path if entry.engine else f"engines/{entry.name}.engine")
    if not path.is_file():
        raise LladaVError(f"backend tensorrt: {path} is missing; build the engines on this device with "
                          f"bash {bundle / 'jetson' / 'build_engines.sh'}")
    return path


class TrtRunner(Runner):
    def __init__(self, entry: SubgraphEntry, fdt, path: Path):
        super().__init__(entry, fdt)
        self.path = path

    def _activate(self):
        import tensorrt as trt
        from polygraphy import cuda

        self.trt, self.cuda = trt, cuda
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise LladaVError(f"{self.name}: {self.path.name} could not be deserialized (corrupt, or built for "
                              "another GPU or TensorRT version: rebuild it on this device)")
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.buffers = self._allocate()

    def _allocate(self) -> dict:
        """One device buffer per tensor, sized for the profile's largest shapes."""
        for t in self.entry.inputs:
            self.context.set_input_shape(t.name, self.entry.shapes[t.name]["max"])
        buffers = {}
        for name in self.names:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))
            buffers[name] = self.cuda.DeviceArray(shape=shape, dtype=dtype)
        return buffers

    def _deactivate(self):
        for buf in self.buffers.values():
            buf.free()
        self.buffers, self.context, self.engine = {}, None, None

    def describe(self, x):
        return numpy_dtype(x.dtype), tuple(x.shape)

    def _infer(self, feeds, keep_on_device):
        cuda = self.cuda
        for t in self.entry.inputs:
            x = feeds[t.name]
            if isinstance(x, (cuda.DeviceView, cuda.DeviceArray)):
                ptr = x.ptr  # already on the device (e.g. decoder_pre's hidden states): no copy
            else:
                host = np.ascontiguousarray(x)
                ptr = self.buffers[t.name].ptr  # the preallocated buffer; only x.nbytes of it are used
                cuda.wrapper().memcpy(ptr, host.ctypes.data, host.nbytes, cuda.MemcpyKind.HostToDevice,
                                      self.stream.ptr)
            self.context.set_input_shape(t.name, tuple(x.shape))
            self.context.set_tensor_address(t.name, ptr)
        outputs = {}
        for t in self.entry.outputs:
            buf = self.buffers[t.name]
            self.context.set_tensor_address(t.name, buf.ptr)
            outputs[t.name] = cuda.DeviceView(buf.ptr, tuple(self.context.get_tensor_shape(t.name)), buf.dtype)
        if not self.context.execute_async_v3(self.stream.ptr):
            raise LladaVError(f"{self.name}: TensorRT execution failed")
        if keep_on_device:
            return outputs
        self.stream.synchronize()
        return {n: v.numpy() for n, v in outputs.items()}

    def to_host(self, x):
        self.stream.synchronize()
        return x.numpy() if isinstance(x, (self.cuda.DeviceView, self.cuda.DeviceArray)) else x

    def stage(self, x: np.ndarray):
        """x uploaded once into a device array this runner owns (the reduced inputs after step 1)."""
        host = np.ascontiguousarray(x)
        staged = self.cuda.DeviceArray(shape=host.shape, dtype=host.dtype)
        self.cuda.wrapper().memcpy(staged.ptr, host.ctypes.data, host.nbytes, self.cuda.MemcpyKind.HostToDevice,
                                   self.stream.ptr)
        self.stream.synchronize()
        self._staged = staged
        return staged

    def write_rows(self, staged, start: int, rows: np.ndarray) -> None:
        """Upload only `rows` into staged[b, start:...] for each batch entry: G rows per step, not n'."""
        host = np.ascontiguousarray(rows, dtype=numpy_dtype(staged.dtype))
        batch, n = staged.shape[0], staged.shape[1]
        row_bytes = host.nbytes // host.shape[0]
        for b in range(batch):
            self.cuda.wrapper().memcpy(staged.ptr + (b * n + start) * row_bytes, host.ctypes.data, host.nbytes,
                                       self.cuda.MemcpyKind.HostToDevice, self.stream.ptr)
        self.stream.synchronize()  # the host rows may be freed once this returns

    def take_rows(self, x, rows: np.ndarray):
        """x[:, rows] on the device: one device-to-device copy per run of consecutive rows."""
        cuda = self.cuda
        batch, n = x.shape[0], x.shape[1]
        dtype = numpy_dtype(x.dtype)
        row_bytes = int(np.prod(x.shape[2:])) * dtype.itemsize
        out = cuda.DeviceArray(shape=(batch, rows.size, *x.shape[2:]), dtype=dtype)
        for b in range(batch):
            for src_row, dst_row, count in row_runs(rows):
                src = x.ptr + (b * n + src_row) * row_bytes
                dst = out.ptr + (b * rows.size + dst_row) * row_bytes
                cuda.wrapper().memcpy(dst, src, count * row_bytes, cuda.MemcpyKind.DeviceToDevice, self.stream.ptr)
        self._gathered = out  # owned here until the next gather (step 1 happens once per generation)
        return out
