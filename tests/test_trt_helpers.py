"""The TensorRT runner's host-side logic, which runs without a GPU (the runner itself cannot)."""

from __future__ import annotations

import numpy as np
from polygraphy.datatype import DataType

from runtime.trt_runner import numpy_dtype, row_runs


def test_row_runs_reassemble_the_gather():
    rows = np.array([0, 1, 2, 5, 6, 9, 12, 13, 14, 15])
    runs = row_runs(rows)
    assert runs == [(0, 0, 3), (5, 3, 2), (9, 5, 1), (12, 6, 4)]
    source = np.arange(20) * 10
    gathered = np.empty(rows.size, dtype=int)
    for src, dst, count in runs:  # what the device-to-device copies do, row by row
        gathered[dst : dst + count] = source[src : src + count]
    assert np.array_equal(gathered, source[rows])
    assert row_runs(np.arange(7)) == [(0, 0, 7)]  # P=0: one copy


def test_numpy_dtype_of_polygraphy_types():
    assert numpy_dtype(DataType.FLOAT16) == np.float16
    assert numpy_dtype(DataType.INT64) == np.int64
    assert numpy_dtype(np.dtype(np.float32)) == np.float32
