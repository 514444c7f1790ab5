"""The CUDA runtime calls the TensorRT backend makes, in one small interface.

Every device allocation, copy, stream, event and sync of the TensorRT backend goes through a
`CudaApi`; nothing else in the project calls CUDA. Two things implement it:

- `CudaRuntime`: libcudart through ctypes. The library is the one Polygraphy's CUDA wrapper
  locates (CUDA toolkit, JetPack's /usr/local/cuda, or a pip CUDA runtime wheel), so the car
  needs no package beyond what the project already requires. We declare the few functions we
  call ourselves rather than use Polygraphy's `Cuda` class because that class has no events
  (per-engine GPU time needs them) and reports failures by number only; cuda-python would add
  a dependency that must match JetPack's CUDA version. Semantics: CUDA Runtime API,
  "API synchronization behavior" (docs/cuda.md).
- the tests' simulation and recorder (`tests/cuda_doubles.py`), which check the order, streams
  and lifetimes of what the backend asks for. They never claim that TensorRT ran.

Host buffers are numpy arrays; device memory is addressed by integer pointers, wrapped in
`DeviceTensor` where it carries a shape.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from runtime.errors import LladaVError


class CudaError(LladaVError):
    """A CUDA runtime call failed (names the call and CUDA's error)."""


@dataclass(frozen=True)
class DeviceTensor:
    """A typed view of device memory that someone else owns (the backend's buffers)."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class CudaApi(Protocol):
    """What the TensorRT backend asks of CUDA. Copies are asynchronous on `stream`: a host array
    given to `copy_dtoh` holds the data only after the stream (or a later event) is synchronised;
    a host array given to `copy_htod` may be dropped by the caller as soon as the call returns (the
    implementation keeps what it still needs alive until the stream is synchronised)."""

    def malloc(self, nbytes: int) -> int: ...
    def free(self, ptr: int) -> None: ...
    def stream_create(self) -> int: ...
    def stream_destroy(self, stream: int) -> None: ...
    def stream_synchronize(self, stream: int) -> None: ...
    def event_create(self) -> int: ...
    def event_destroy(self, event: int) -> None: ...
    def event_record(self, event: int, stream: int) -> None: ...
    def event_synchronize(self, event: int) -> None: ...
    def event_elapsed_ms(self, start: int, end: int) -> float: ...
    def copy_htod(self, dst: int, src: np.ndarray, stream: int) -> None: ...
    def copy_dtoh(self, dst: np.ndarray, src: int, stream: int) -> None: ...
    def copy_dtod(self, dst: int, src: int, nbytes: int, stream: int) -> None: ...
    def copy_2d_dtod(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int,
                     stream: int) -> None: ...


_HOST_TO_DEVICE, _DEVICE_TO_HOST, _DEVICE_TO_DEVICE = 1, 2, 3  # cudaMemcpyKind
_P, _SZ, _INT = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
_SIGNATURES = {  # name: argtypes; every function returns cudaError_t (int)
    "cudaMalloc": [ctypes.POINTER(_P), _SZ],
    "cudaFree": [_P],
    "cudaStreamCreate": [ctypes.POINTER(_P)],
    "cudaStreamDestroy": [_P],
    "cudaStreamSynchronize": [_P],
    "cudaEventCreate": [ctypes.POINTER(_P)],
    "cudaEventDestroy": [_P],
    "cudaEventRecord": [_P, _P],
    "cudaEventSynchronize": [_P],
    "cudaEventElapsedTime": [ctypes.POINTER(ctypes.c_float), _P, _P],
    "cudaMemcpyAsync": [_P, _P, _SZ, _INT, _P],
    "cudaMemcpy2DAsync": [_P, _SZ, _P, _SZ, _SZ, _SZ, _INT, _P],
}


def load_cudart() -> ctypes.CDLL:
    """libcudart as Polygraphy finds it, in a CDLL of our own (our signatures do not touch Polygraphy's)."""
    try:
        from polygraphy import cuda

        path = cuda.wrapper().handle._name
        lib = ctypes.CDLL(path)
    except Exception as exc:  # Polygraphy raises its own exception type when the library is missing
        raise CudaError(f"CUDA runtime library (libcudart) could not be loaded ({exc}); on the Jetson it comes "
                        "with JetPack (/usr/local/cuda/lib64)") from None
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, _INT
    lib.cudaGetErrorName.argtypes = lib.cudaGetErrorString.argtypes = [_INT]
    lib.cudaGetErrorName.restype = lib.cudaGetErrorString.restype = ctypes.c_char_p
    return lib


class CudaRuntime:
    """`CudaApi` over libcudart."""

    def __init__(self, lib: ctypes.CDLL | None = None):
        self.lib = lib or load_cudart()
        # host sources of copies not yet known to be done: from pageable memory cudaMemcpyAsync "might be
        # synchronous with respect to host" (docs/cuda.md), so nothing says the source was read on return
        self.in_flight: dict[int, list[np.ndarray]] = {}

    def _call(self, name: str, *args) -> None:
        status = getattr(self.lib, name)(*args)
        if status != 0:
            raise CudaError(f"{name} failed: {self.lib.cudaGetErrorName(status).decode()} "
                            f"({self.lib.cudaGetErrorString(status).decode()})")

    def _new_handle(self, name: str, *args) -> int:
        handle = _P()
        self._call(name, ctypes.byref(handle), *args)
        return handle.value

    def malloc(self, nbytes: int) -> int:
        return self._new_handle("cudaMalloc", nbytes)

    def free(self, ptr: int) -> None:
        self._call("cudaFree", ptr)

    def stream_create(self) -> int:
        return self._new_handle("cudaStreamCreate")

    def stream_destroy(self, stream: int) -> None:
        self._call("cudaStreamDestroy", stream)

    def stream_synchronize(self, stream: int) -> None:
        self._call("cudaStreamSynchronize", stream)
        self.in_flight.pop(stream, None)

    def event_create(self) -> int:
        return self._new_handle("cudaEventCreate")

    def event_destroy(self, event: int) -> None:
        self._call("cudaEventDestroy", event)

    def event_record(self, event: int, stream: int) -> None:
        self._call("cudaEventRecord", event, stream)

    def event_synchronize(self, event: int) -> None:
        self._call("cudaEventSynchronize", event)

    def event_elapsed_ms(self, start: int, end: int) -> float:
        ms = ctypes.c_float()
        self._call("cudaEventElapsedTime", ctypes.byref(ms), start, end)
        return float(ms.value)

    def copy_htod(self, dst: int, src: np.ndarray, stream: int) -> None:
        assert src.flags.c_contiguous, "host source must be C-contiguous"
        self._call("cudaMemcpyAsync", dst, src.ctypes.data, src.nbytes, _HOST_TO_DEVICE, stream)
        self.in_flight.setdefault(stream, []).append(src)

    def copy_dtoh(self, dst: np.ndarray, src: int, stream: int) -> None:
        assert dst.flags.c_contiguous and dst.flags.writeable, "host destination must be writable and C-contiguous"
        self._call("cudaMemcpyAsync", dst.ctypes.data, src, dst.nbytes, _DEVICE_TO_HOST, stream)

    def copy_dtod(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self._call("cudaMemcpyAsync", dst, src, nbytes, _DEVICE_TO_DEVICE, stream)

    def copy_2d_dtod(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int,
                     stream: int) -> None:
        """`height` rows of `width` bytes, row i from src + i * src_pitch to dst + i * dst_pitch: one call."""
        self._call("cudaMemcpy2DAsync", dst, dst_pitch, src, src_pitch, width, height, _DEVICE_TO_DEVICE, stream)
