"""The PyTorch backend: the reference modules (export.subgraphs) as runners (runtime.backends.base's
contract), for debugging and parity on the workstation. It needs torch and the checkpoint the bundle
was built from, so it lives here, not in the car's runtime/: the runtime finds it through the
`lladav_edge.backends` entry point (pyproject.toml; runtime.backends)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.bundle import Bundle
from runtime.errors import LladaVError
from runtime.backends.base import Runner


class TorchRunner(Runner):
    """The PyTorch reference modules (export.subgraphs) on the CPU: debugging and parity."""

    def __init__(self, entry, float_dtype, module):
        super().__init__(entry, float_dtype)
        self.module = module

    def _activate(self):
        self.module.eval()

    def _infer(self, feeds, keep_on_device, profile):
        import torch

        # writable, C-ordered copies where a feed is a read-only view (torch.from_numpy warns on those)
        args = [torch.from_numpy(np.require(feeds[t.name], requirements=["C", "W"])) for t in self.entry.inputs]
        with torch.inference_mode():
            outs = self.module(*args)
        return {t.name: o.numpy() for t, o in zip(self.entry.outputs, outs)}


def torch_runners(bundle: Bundle, model_dir=None, **_) -> dict:
    """{subgraph: TorchRunner} from the checkpoint at model_dir, or the one the manifest names; refused
    unless it is the one the bundle was built from (content hash)."""
    import torch

    from export.checkpoint import load_model, open_checkpoint
    from export.subgraphs import SUBGRAPHS

    manifest, float_dtype = bundle.manifest, bundle.float_dtype
    path = Path(model_dir or manifest.model["source"])
    if model_dir is None and not path.is_dir():
        raise LladaVError(f"pytorch backend: the checkpoint {str(path)!r} (recorded in the bundle's manifest when it "
                          "was built) is not there; point to it with --model")
    ckpt = open_checkpoint(path)
    if ckpt.content_hash() != manifest.model["content_hash"]:
        raise LladaVError(f"pytorch backend: checkpoint {str(path)!r} is not the one this bundle was built from "
                          f"(content hash {ckpt.content_hash()[:12]}; bundle {manifest.model['content_hash'][:12]})")
    model, _ = load_model(path, {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}[float_dtype])
    return {s.name: TorchRunner(manifest.subgraphs[s.name], float_dtype, s.build(model, manifest.k)) for s in SUBGRAPHS}
