"""A Polygraphy runner for a PyTorch module on the CPU (Polygraphy's own PytRunner needs CUDA).

One lifecycle (activate / infer / deactivate) and one `infer(feed_dict)` contract, so the
Comparator can set the PyTorch reference beside OnnxrtRunner and, on a GPU host, TrtRunner.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.datatype import DataType


class TorchRunner(BaseRunner):
    def __init__(self, module: torch.nn.Module, inputs: list[tuple[str, str, tuple]], output_names: list[str],
                 name: str | None = None):
        """inputs: (name, numpy dtype name, shape with None for dynamic axes) in forward order."""
        super().__init__(name=name, prefix="torch-runner")
        self.module, self.inputs, self.output_names = module, inputs, output_names

    def activate_impl(self):
        self.module.eval()

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for name, dtype, shape in self.inputs:
            meta.add(name, dtype=DataType.from_dtype(np.dtype(dtype), "numpy"), shape=shape)
        return meta

    def infer_impl(self, feed_dict):
        args = [torch.from_numpy(feed_dict[name]) for name, _, _ in self.inputs]
        start = time.time()
        with torch.inference_mode():
            outputs = self.module(*args)
        self.inference_time = time.time() - start
        return OrderedDict((n, o.numpy()) for n, o in zip(self.output_names, outputs))

    def deactivate_impl(self):
        pass
