"""What a CUDA GPU checks without TensorRT: runtime/backends/cuda.py's success path over the real libcudart, and
the TensorRT backend's device work (buffers, copies, the KV cache's strided gathers, one stream) with
stand-in engines that read their inputs from and write their outputs to real device memory, computing
with ONNX Runtime on the CPU.

    python -m pytest tests/gpu -q        # test_tensorrt.py also needs TensorRT; this file only a GPU

Without a usable GPU the module is skipped with the reason.
"""

from __future__ import annotations

import numpy as np
import pytest

from runtime.backends.cuda import CudaError, CudaRuntime


def _usable() -> tuple[bool, str]:
    try:
        cuda = CudaRuntime()
        cuda.free(cuda.malloc(16))
    except CudaError as exc:
        return False, str(exc)
    return True, ""


USABLE, WHY = _usable()
if not USABLE:
    pytest.skip(f"needs a CUDA GPU: {WHY}", allow_module_level=True)

from runtime.caching import CacheSettings  # noqa: E402
from runtime.pipeline import Pipeline  # noqa: E402
from runtime.pruning import PruneSettings  # noqa: E402
from runtime.schedule import GenerationSettings  # noqa: E402
from runtime.backends.trt import make_trt_runners  # noqa: E402
from tests.conftest import gradient_image  # noqa: E402
from tests.cuda_doubles import SimulatedEngine  # noqa: E402

GEN = GenerationSettings(steps=4, gen_length=8, block_length=4)
PROMPT = "What is ahead of the car?"


def test_cuda_runtime_success_path():
    """malloc, host<->device and device<->device copies, a strided 2D gather, events and a stream."""
    cuda = CudaRuntime()
    stream, start, end = cuda.stream_create(), cuda.event_create(), cuda.event_create()
    x = np.arange(4 * 6, dtype=np.float32).reshape(4, 6)
    a, b, c = (cuda.malloc(x.nbytes) for _ in range(3))
    try:
        cuda.event_record(start, stream)
        cuda.copy_htod(a, x, stream)
        cuda.copy_dtod(b, a, x.nbytes, stream)
        # columns 2..4 of each row of b -> a packed (4, 3) block in c
        cuda.copy_2d_dtod(c, 3 * 4, b + 2 * 4, 6 * 4, 3 * 4, 4, stream)
        back, packed = np.zeros_like(x), np.zeros((4, 3), np.float32)
        cuda.copy_dtoh(back, b, stream)
        cuda.copy_dtoh(packed, c, stream)
        cuda.event_record(end, stream)
        cuda.stream_synchronize(stream)
        cuda.event_synchronize(end)
        assert np.array_equal(back, x) and np.array_equal(packed, x[:, 2:5])
        assert cuda.event_elapsed_ms(start, end) >= 0.0
    finally:
        for ptr in (a, b, c):
            cuda.free(ptr)
        for event in (start, end):
            cuda.event_destroy(event)
        cuda.stream_destroy(stream)


class DeviceOrtEngine(SimulatedEngine):
    """An engine stand-in over real CUDA: on enqueue it waits for the stream (the work before it), reads
    its inputs from their device addresses, runs ONNX Runtime, and writes its outputs to theirs."""

    def __init__(self, manifest, name, float_dtype, cuda, session):
        super().__init__(manifest, name, float_dtype, cuda)
        self.session = session

    def enqueue(self, stream: int) -> bool:
        if set(self.addresses) != set(self.names) or not all(t.name in self.shapes for t in self.entry.inputs):
            return False
        self.cuda.stream_synchronize(stream)
        seen = {}
        for t in self.entry.inputs:
            seen[t.name] = np.empty(self.shape(t.name), self.dtype(t.name))
            if seen[t.name].size:
                self.cuda.copy_dtoh(seen[t.name], self.addresses[t.name], stream)
        self.cuda.stream_synchronize(stream)
        self.runs.append(seen)
        got = dict(zip([o.name for o in self.session.get_outputs()], self.session.run(None, seen)))
        for t in self.entry.outputs:
            value = np.ascontiguousarray(got[t.name], dtype=self.dtype(t.name))
            assert value.shape == self.shape(t.name), (t.name, value.shape, self.shape(t.name))
            if value.size:
                self.cuda.copy_htod(self.addresses[t.name], value, stream)
        self.cuda.stream_synchronize(stream)  # the host array is not kept alive past this call
        return True


def session(path):
    """ONNX Runtime on the CPU: the test is about device memory, and the ONNX Runtime backend it is
    compared with token for token runs on the CPU too (a CUDA provider may use TF32 MatMuls)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def device_runners(bundle):
    def engine(name, path):
        return DeviceOrtEngine(bundle.manifest, name, bundle.float_dtype, CudaRuntime(), session(bundle.graph(name)))

    return make_trt_runners(bundle, CudaRuntime, engine, True)


@pytest.mark.parametrize("p", [0, 50])
@pytest.mark.parametrize("cache", ["none", "dual"])
def test_the_backends_device_work_over_real_cuda_gives_onnxruntimes_tokens(runtime_bundles, cache, p):
    img, prune = gradient_image(160, 120), PruneSettings(k=15, p=p)
    kv = CacheSettings(mode=cache)
    with Pipeline(runtime_bundles[15], backend="onnxruntime") as pipe:
        want = pipe.generate(img, PROMPT, GEN, prune, cache=kv)
    with Pipeline(runtime_bundles[15], backend="tensorrt", runner_factory=device_runners) as pipe:
        got = pipe.generate(img, PROMPT, GEN, prune, cache=kv)
    assert got.answer_ids == want.answer_ids and got.kept_visual.tolist() == want.kept_visual.tolist()
