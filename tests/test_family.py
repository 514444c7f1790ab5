"""Checkpoints of other shapes than ours: each builds at every precision and matches the model at fp32;
export faults planted in each are refused by name (export.yardstick's rule, docs/export.md)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from export.build import BuildRequest, build_bundle
from export.checkpoint import load_model
from export.onnx_export import ParityError, check_parity, check_visual_tokens, export_and_validate, ort_session
from export.profiles import VALIDATION_SIZES
from export.subgraphs import DECODER_POST, DECODER_PRE, VISION
from export.tiny import FAMILY, write_random
from runtime.pipeline import Pipeline
from runtime.pruning import PruneSettings
from runtime.schedule import GenerationSettings
from runtime.tokens import TextTokenizer
from tests import faults
from tests.conftest import RUNTIME_PROFILE, gradient_image

GEN = GenerationSettings(steps=4, gen_length=8, block_length=8)

quiet = lambda m: None  # noqa: E731
PROFILE = RUNTIME_PROFILE.__class__(**{**RUNTIME_PROFILE.__dict__, "layout": "anyres", "opt_image": (640, 360),
                                       "max_image": (640, 360)})  # calibration scenes


@pytest.fixture(scope="module", params=sorted(FAMILY))
def member(request, tmp_path_factory):
    cfg, ids = FAMILY[request.param]
    return request.param, write_random(tmp_path_factory.mktemp("family") / request.param, cfg, ids), ids


def pruning_layer(n_layers: int) -> int:
    return min(15, n_layers // 2)


def test_each_member_builds_at_every_precision_and_matches_at_fp32(member, tmp_path):
    """fp32 matches the float64 model to 1e-5 of each output's scale (an independent computation);
    fp16 passes its checkpoint's own rule; int8 and int4 build on those graphs (calibrated by running
    them), in one bundle directory so the float graphs are exported once."""
    from calib.data import CalibrationSettings
    from calib.stage import QuantSettings

    name, path, ids = member
    k = pruning_layer(FAMILY[name][0].n_layers)
    assert TextTokenizer(path).ids.to_dict() == (ids or TextTokenizer(path).ids.to_dict())
    fp32 = build_bundle(BuildRequest(path, tmp_path / "fp32", k, 50, "fp32", PROFILE), log=quiet).manifest
    for entry in fp32.subgraphs.values():
        for per_output in entry.validation.values():
            for output, check in per_output.items():
                assert check["max_abs_diff"] <= 1e-5 * check["scale"], (name, entry.name, output, check)
    out = tmp_path / "quant"
    for precision in ("fp16", "int8", "int4"):
        quant = None if precision == "fp16" else QuantSettings.for_mode(
            precision, calibration=CalibrationSettings(samples=2, steps_recorded=2), data_root=tmp_path / "calib")
        m = build_bundle(BuildRequest(path, out, k, 50, precision, PROFILE, opset=19, quant=quant), log=quiet).manifest
        assert m.precision == precision and m.token_ids == TextTokenizer(path).ids.to_dict()
        for entry in m.subgraphs.values():
            checks = [c for per_output in entry.validation.values() for c in per_output.values()]
            assert checks and all(c["max_abs_diff"] <= c["allowed"] for c in checks)
        if precision != "fp16":  # their float graphs were validated above; the quantized ones did their own checks
            for g in ("decoder_pre", "decoder_post"):
                q = m.subgraphs[g].quantization
                assert m.subgraphs[g].precision == precision and q["quantized"]["weights"] > 0
                assert all(np.isfinite(e["max_abs_diff"]) for e in q["error_vs_float"].values())
        if precision == "int4":  # judged as the int4 model's graphs: the float model's they are not
            model16, _ = load_model(path, torch.float16)
            entry = m.subgraphs["decoder_post"]
            assert "float_validation" in entry.quantization
            with pytest.raises(ParityError, match=r"^decoder_post: output \w+ differs from the model by"):
                check_parity(out / entry.onnx.path, DECODER_POST, DECODER_POST.build(model16, k), model16.cfg, "fp16",
                             list(VALIDATION_SIZES), ort_session(out / entry.onnx.path, quantized=True, exact=True), k)
        with Pipeline(out) as pipe:  # and each answers
            result = pipe.generate(gradient_image(320, 180), "Is the road clear?", GEN, PruneSettings(k=k, p=50))
        assert len(result.answer_ids) <= GEN.gen_length and result.kept_visual.size > 0


def planted(model, cfg):
    """(what, spec, faulty model, export patch) for one checkpoint: each a different mistake."""
    n, k = cfg.n_layers, pruning_layer(cfg.n_layers)
    theta = 10000.0 if cfg.decoder.rope_theta != 10000.0 else 500000.0
    none = contextlib.nullcontext
    return [("a vision layer skipped", VISION, faults.vision_layer_skipped(model), none),
            ("a decoder layer skipped", DECODER_PRE, faults.layer_skipped(model, k - 1), none),
            ("the last layer skipped", DECODER_POST, faults.layer_skipped(model, n - 1), none),
            (f"RoPE theta {theta:g}", DECODER_PRE, faults.rope_theta_wrong(model, theta), none),
            ("q_proj transposed", DECODER_POST, faults.weight_transposed(model, n - 1), none),
            ("a causal mask", DECODER_PRE, model, faults.causal_attention)]


@pytest.fixture(scope="module", params=["tiny", *sorted(FAMILY)])
def checkpoint16(request, tiny_dir, tmp_path_factory):
    if request.param == "tiny":
        return load_model(tiny_dir, torch.float16)
    cfg, ids = FAMILY[request.param]
    return load_model(write_random(tmp_path_factory.mktemp("f16") / request.param, cfg, ids), torch.float16)


def test_planted_faults_fail_validation_naming_graph_and_output(checkpoint16, tmp_path):
    model, ckpt = checkpoint16
    cfg, k = ckpt.config, pruning_layer(ckpt.config.n_layers)
    for what, spec, bad, patch in planted(model, cfg):
        with patch(), pytest.raises(ParityError) as caught:
            export_and_validate(spec, spec.build(bad, k), cfg, "fp16", tmp_path / f"{spec.name}.onnx",
                                list(VALIDATION_SIZES), k=k, reference=spec.build(model, k))
        message = str(caught.value)
        assert message.startswith(f"{spec.name}: output ") and "differs from the model by" in message, (what, message)
        assert not list(tmp_path.glob("*.onnx*")), what  # nothing half-written is left
    # the correct export of the same checkpoint passes (the rule is not just strict)
    export_and_validate(DECODER_PRE, DECODER_PRE.build(model, k), cfg, "fp16", tmp_path / "ok.onnx",
                        list(VALIDATION_SIZES), k=k)


def test_a_missing_image_newline_fails_the_visual_token_check(checkpoint16, tmp_path):
    model, ckpt = checkpoint16
    path = export_and_validate(VISION, VISION.build(model, 1), ckpt.config, "fp16", tmp_path / "v.onnx",
                               list(VALIDATION_SIZES)[:1]).onnx
    newline = model.model.image_newline.detach().numpy()
    ok = check_visual_tokens(path, newline, model, ckpt.config, "fp16")["visual_tokens"]
    assert ok["max_abs_diff"] <= ok["allowed"]
    with pytest.raises(ParityError, match=r"^vision: visual_tokens .*image_newline"):
        check_visual_tokens(path, np.zeros_like(newline), model, ckpt.config, "fp16")


def test_a_checkpoint_that_overflows_float16_is_refused_with_the_reason(checkpoint16, tmp_path):
    """Activations beyond float16's range in the model itself: the yardstick is not finite, and the
    export is refused by name (not passed by an infinite bound)."""
    model, ckpt = checkpoint16
    if ckpt.path.name != "tiny":
        pytest.skip("one checkpoint suffices")
    k = pruning_layer(ckpt.config.n_layers)
    huge = faults.weight_scaled(model, k, 3e4)  # decoder_post's first MLP overflows at fp16
    with pytest.raises(ParityError, match=r"^decoder_post: output \w+: the model itself gives non-finite values at fp16"):
        export_and_validate(DECODER_POST, DECODER_POST.build(huge, k), ckpt.config, "fp16", tmp_path / "p.onnx",
                            list(VALIDATION_SIZES), k=k)
