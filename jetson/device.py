"""The device a profile ran on, and its clocks (docs/orin.md).

Identity: /proc/device-tree/model, L4T from /etc/nv_tegra_release, TensorRT's version,
`nvpmodel -q`, `jetson_clocks --show`. Clocks: `jetson_clocks --store FILE` first, then
`jetson_clocks` pins CPU/GPU/EMC to the power mode's maximum, and `jetson_clocks --restore FILE`
puts them back at exit, also after an error or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path

MODEL_FILE = Path("/proc/device-tree/model")
L4T_FILE = Path("/etc/nv_tegra_release")


def _read(path: Path) -> str | None:
    try:
        return path.read_bytes().decode(errors="replace").strip("\x00\n ")
    except OSError:
        return None


def _run(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def tensorrt_version() -> str | None:
    try:
        import tensorrt

        return tensorrt.__version__
    except ImportError:
        return None


def identity(clocks_locked: bool) -> dict:
    """What the report says about the machine. `clocks_locked` is whether this run pinned them."""
    model, l4t = _read(MODEL_FILE), _read(L4T_FILE)
    return {
        "jetson": is_jetson(),
        "model": model or platform.processor() or platform.machine(),
        "l4t": l4t.splitlines()[0] if l4t else None,
        "tensorrt": tensorrt_version(),
        "nvpmodel": _run(["nvpmodel", "-q"]),
        "clocks": _run(["jetson_clocks", "--show"]),
        "clocks_locked": clocks_locked,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
    }


def clock_commands(store: Path) -> tuple[list[str], list[str], list[str]]:
    """(store, lock, restore) commands."""
    return (["sudo", "jetson_clocks", "--store", str(store)], ["sudo", "jetson_clocks"],
            ["sudo", "jetson_clocks", "--restore", str(store)])


@contextlib.contextmanager
def locked_clocks(store: Path, run):
    """Store, pin, and restore at exit whatever happens inside (errors and Ctrl-C included).
    `run(cmd)` executes a command and raises on failure."""
    save, lock, restore = clock_commands(store)
    run(save)
    try:
        run(lock)
        yield
    finally:
        run(restore)


def require_gpu() -> None:
    """A usable CUDA GPU, or a LladaVError saying why not (one 1-byte allocation through libcudart)."""
    from runtime.backends.cuda import CudaError, CudaRuntime
    from runtime.errors import LladaVError

    try:
        cuda = CudaRuntime()
        cuda.free(cuda.malloc(1))
    except CudaError as exc:
        raise LladaVError(f"backend tensorrt: no usable GPU ({exc}); use --backend onnxruntime on this machine") from None


def is_jetson() -> bool:
    model = _read(MODEL_FILE)
    return bool(model and "jetson" in model.lower())
