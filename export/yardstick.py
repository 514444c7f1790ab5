"""How far an exported graph may be from the model: a bound that follows from the checkpoint in hand.

A graph at reduced precision differs from the exact model by its own rounding noise, and that
noise depends on the checkpoint (its depth, widths, activation scales, RoPE theta...). A fixed
tolerance tuned on our models refuses a correct export of another checkpoint, or passes a faulty
one on a checkpoint whose noise is larger. So each output is judged against a yardstick measured
on this checkpoint, on the same feeds (docs/export.md, "Validation"):

    reference   the PyTorch model with every weight and activation in a wider type
                (float32 for an fp16 graph, float64 for an fp32 graph): the exact model
    yardstick   the same PyTorch model at the graph's float type, against the reference:
                noise = max |yardstick - reference|, what that precision costs on this checkpoint
    graph       ONNX Runtime on the exported graph: error = max |graph - reference|

    error <= NOISE_FACTOR * noise + unit roundoff(graph float) * max |reference|

The second term is one rounding of the output itself (a perfect graph still stores its result in
its float type). NOISE_FACTOR covers that two correct implementations round differently (ONNX
Runtime's kernels against PyTorch's); it was measured, not tuned to pass (docs/export.md).

Scores that choose tokens are also judged by what they decide: at the bundle's P, every token whose
reference score is further than the bound from the cut must fall on the same side of it in the
graph (near-ties may go either way).

The reference never runs through the export patches (export.subgraphs.export_patches): a fault
there shows up as an error, not as a larger yardstick.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import numpy as np
import torch

from runtime.pruning import keep_by_score

# max |ORT graph - reference| / max |PyTorch at the graph's precision - reference|, measured over the
# family of checkpoints (docs/export.md): at most 0.83 for fp16, 2.0 for fp32; planted faults 30 and more.
NOISE_FACTOR = 4.0
REFERENCE_DTYPE = {"fp16": torch.float32, "fp32": torch.float64}
UNIT_ROUNDOFF = {"fp16": 2.0 ** -11, "fp32": 2.0 ** -24}


@contextlib.contextmanager
def widened(module: torch.nn.Module, dtype: torch.dtype):
    """Run `module` with every parameter-holding submodule widened to `dtype` while it runs: its
    parameters and floating inputs are cast on entry, the original parameters put back on exit. Only
    one submodule's weights exist widened at a time (an 8B half never does as a whole); the module is
    unchanged afterwards (the casts up are exact)."""
    handles = []

    def enter(mod, args, kwargs):
        mod._saved_parameters = dict(mod._parameters)
        for name, p in mod._saved_parameters.items():
            if p is not None and p.is_floating_point():
                mod._parameters[name] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
        cast = lambda x: x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x  # noqa: E731
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    def leave(mod, args, kwargs, output):
        mod._parameters.update(mod._saved_parameters)
        del mod._saved_parameters

    for mod in module.modules():
        if any(p is not None for p in mod._parameters.values()):
            handles.append(mod.register_forward_pre_hook(enter, with_kwargs=True))
            handles.append(mod.register_forward_hook(leave, with_kwargs=True))
    try:
        yield module
    finally:
        for h in handles:
            h.remove()


def run_module(module: torch.nn.Module, feeds: dict, input_names: list[str], output_names: list[str],
               widen_to: torch.dtype | None = None) -> dict[str, np.ndarray]:
    """The module's outputs on `feeds` (numpy), at its own precision or widened (float inputs too)."""
    args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in input_names]
    context = widened(module, widen_to) if widen_to is not None else contextlib.nullcontext()
    with context, torch.no_grad():
        if widen_to is not None:
            args = [a.to(widen_to) if a.is_floating_point() else a for a in args]
        outputs = module(*args)
    return OrderedDict((n, o.detach().to(torch.float64).numpy()) for n, o in zip(output_names, outputs))


def noise_check(got, yard, ref, precision: str) -> dict:
    """The rule's numbers for one output: error and noise against the reference, the bound, the rule."""
    got, yard, ref = (np.asarray(x, np.float64) for x in (got, yard, ref))
    error, noise = float(np.max(np.abs(got - ref))), float(np.max(np.abs(yard - ref)))
    scale = float(np.max(np.abs(ref)))
    u = UNIT_ROUNDOFF[precision]
    allowed = NOISE_FACTOR * noise + u * scale
    ref_name = {"fp16": "fp32", "fp32": "fp64"}[precision]
    return {"max_abs_diff": error, "allowed": allowed, "noise": noise, "scale": scale,
            "rule": f"{NOISE_FACTOR:g} x noise {noise:.3g} (PyTorch {precision} vs {ref_name}) + {u:.3g} * max|ref| {scale:.3g}"}


def decision_check(got, ref, p: float, margin: float) -> dict:
    """Per batch row, the tokens keep_by_score keeps at P from the graph's scores and from the
    reference's: every token further than `margin` from the reference's cut must be on the same side.
    Returns counts and the tokens that moved ({"moved": [(row, token)], "near_ties": n, "decided": n})."""
    got, ref = np.atleast_2d(np.asarray(got, np.float64)), np.atleast_2d(np.asarray(ref, np.float64))
    moved, near, decided = [], 0, 0
    for row, (g, r) in enumerate(zip(got, ref)):
        keep_ref, keep_got = keep_by_score(r, p), keep_by_score(g, p)
        n_keep = keep_ref.size
        if n_keep in (0, r.size):
            continue  # nothing is dropped (or kept): no cut
        ordered = np.sort(r)[::-1]
        cut = 0.5 * (ordered[n_keep - 1] + ordered[n_keep])
        clear = np.abs(r - cut) > margin
        near += int(np.count_nonzero(~clear))
        decided += int(np.count_nonzero(clear))
        in_ref, in_got = np.zeros(r.size, bool), np.zeros(r.size, bool)
        in_ref[keep_ref], in_got[keep_got] = True, True
        moved += [(row, int(t)) for t in np.flatnonzero(clear & (in_ref != in_got))]
    return {"moved": moved, "near_ties": near, "decided": decided}


def engine_tolerances(checks: dict, precision: str) -> dict[str, list[float]]:
    """{output: [atol, rtol]} for the engine check (TensorRT against ONNX Runtime on the same graph, on
    the car: runtime.checks' rule atol + rtol * max|ref|), from this export's validation: each is within
    NOISE_FACTOR * noise + u * max|ref| of the model, so the two within twice that of each other."""
    noise: dict[str, float] = {}
    for per_output in checks.values():
        for output, check in per_output.items():
            if "noise" in check:
                noise[output] = max(noise.get(output, 0.0), check["noise"])
    return {output: [2 * NOISE_FACTOR * n, 2 * UNIT_ROUNDOFF[precision]] for output, n in noise.items()}
