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

Scores that choose tokens are also judged by what they decide (decision_check): at the bundle's P,
the tokens the graph keeps against the reference's, bounded by the decisions the yardstick itself
changes.

The reference never runs through the export patches (export.subgraphs.export_patches): a fault
there shows up as an error, not as a larger yardstick.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

from runtime.pruning import keep_by_score, keep_duplicate_aware

# max |ORT graph - reference| / max |PyTorch at the graph's precision - reference|, measured over the
# family of checkpoints (docs/export.md): at most 0.83 for fp16, 1.65 for fp32; planted faults 30 and more.
NOISE_FACTOR = 4.0
REFERENCE_DTYPE = {"fp16": torch.float32, "fp32": torch.float64}
UNIT_ROUNDOFF = {"fp16": 2.0 ** -11, "fp32": 2.0 ** -24}


@contextlib.contextmanager
def widened(module: torch.nn.Module, dtype: torch.dtype):
    """Run `module` with every parameter-holding submodule widened to `dtype` while it runs: its
    parameters and floating inputs are cast on entry, the original parameters put back on exit (also
    when its forward raises). Only one submodule's weights exist widened at a time (an 8B half never
    does as a whole); the module is unchanged afterwards. A softmax asked for in a narrower type
    (SigLIP's float32) runs at the wider one, so a float64 reference is float64 throughout."""
    handles, stacks = [], {}

    def enter(mod, args, kwargs):
        saved = dict(mod._parameters)
        stacks.setdefault(mod, []).append(saved)
        for name, p in saved.items():
            if p is not None and p.is_floating_point():
                mod._parameters[name] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
        cast = lambda x: x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x  # noqa: E731
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    def leave(mod, args, kwargs, output):
        mod._parameters.update(stacks[mod].pop())

    def softmax(input, dim=None, _stacklevel=3, dtype=None):
        if dtype is not None and torch.finfo(dtype).bits < torch.finfo(input.dtype).bits:
            dtype = None
        return saved_softmax(input, dim=dim, dtype=dtype)

    for mod in module.modules():
        if any(p is not None for p in mod._parameters.values()):
            handles.append(mod.register_forward_pre_hook(enter, with_kwargs=True))
            handles.append(mod.register_forward_hook(leave, with_kwargs=True, always_call=True))
    saved_softmax, F.softmax = F.softmax, softmax
    try:
        yield module
    finally:
        F.softmax = saved_softmax
        for h in handles:
            h.remove()
        for mod, stack in stacks.items():  # a forward that raised before its exit hook ran
            if stack:
                mod._parameters.update(stack[0])


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


def decision_rule(chooses: str, feeds: dict, p: float):
    """What a token-choosing output decides at P: row -> kept indices (runtime.pruning, the runtime's rules)."""
    if chooses == "saliency":
        return lambda row: keep_by_score(row, p)
    assert chooses == "similarity", f"unknown choice {chooses!r}"
    return lambda row: keep_duplicate_aware(row, feeds["pivots"], p)


def decision_check(got, yard, ref, keep) -> dict:
    """What a score decides, judged by the same yardstick as its values: per batch row, the tokens
    keep(row) keeps (decision_rule: the runtime's rule at the bundle's P) from the graph's scores, from
    the yardstick's and from the reference's. A token kept by the reference and dropped by the graph
    (or the reverse) "moved"; the checkpoint's own noise moves some at the graph's precision (the
    yardstick's moves). Allowed: NOISE_FACTOR x the yardstick's moves + one per row (a near-tie). A
    value bound relative to the largest score cannot see a reordering of the small scores around the
    cut (saliency values are ~1/N); this does."""
    got, yard, ref = (np.asarray(x, np.float64) for x in (got, yard, ref))
    if got.ndim == 1:
        got, yard, ref = got[None], yard[None], ref[None]
    moved, moved_yard, first = 0, 0, []
    for row, (g, y, r) in enumerate(zip(got, yard, ref)):
        keep_ref = set(keep(r).tolist())
        lost = sorted(keep_ref - set(keep(g).tolist()))
        moved += len(lost)
        moved_yard += len(keep_ref - set(keep(y).tolist()))
        first += [(row, t) for t in lost[:3]]
    allowed = NOISE_FACTOR * moved_yard + got.shape[0]
    return {"moved": moved, "moved_yardstick": moved_yard, "allowed_moves": allowed, "first_moved": first[:3]}


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
