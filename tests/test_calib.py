"""calib/: calibration data from the pipeline, INT8 Q/DQ by TensorRT's rules, int8 bundles end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calib.data import CalibrationSettings, load_calibration, record_calibration, recorded_steps
from calib.quantize import INT8, QuantizationError, check_qdq, quantize_graph
from runtime.errors import LladaVError

quiet = lambda *a: None  # noqa: E731


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory):
    """The shipped miniature as an int8 bundle at K=15, calibrated on 8 generator questions, its vision
    tower quantized too (--quantize-vision; the int4 bundle keeps the default fp16 vision)."""
    from calib.stage import QuantSettings
    from export.build import BuildRequest, build_bundle
    from export.profiles import ProfileSettings
    from miniature import embedded_checkpoint

    root = tmp_path_factory.mktemp("int8")
    profile = ProfileSettings(layout="anyres", max_text_tokens=96, opt_text_tokens=64, max_response=32,
                              opt_response=8, opt_image=(640, 360))
    q = QuantSettings.for_mode("int8", calibration=CalibrationSettings(samples=8), data_root=root / "calibration",
                               quantize_vision=True)
    req = BuildRequest(embedded_checkpoint(), root / "k15", 15, 50, "int8", profile, quant=q)
    return build_bundle(req, log=quiet).out


def _graph(bundle, name):
    return onnx.load(str(bundle / "onnx" / f"{name}.onnx"), load_external_data=True)


def test_int8_bundle_quantizes_the_decoder_linears_by_tensorrts_rules(int8_bundle):
    """Read back independently of calib.quantize: every linear layer of both decoder halves has an int8
    weight with one float16 scale per output channel (axis 1) and a per-tensor activation Q/DQ; every zero
    point is 0; attention and the LM head stay float; the vision tower (asked for) has the same rules with
    its attention float too; the graphs say they are int8."""
    from runtime.bundle import read_manifest

    m = read_manifest(int8_bundle)
    assert m.precision == "int8" and m.opset == 19
    layers = {"decoder_pre": 15, "decoder_post": 32 - 15, "vision": m.model["vision"]["layers"]}
    per_layer = {"decoder_pre": 7, "decoder_post": 7, "vision": 6}  # vision: q, k, v, out, fc1, fc2
    for name, entry in m.subgraphs.items():
        model = _graph(int8_bundle, name)
        props = {p.key: p.value for p in model.metadata_props}
        if name == "similarity":  # no weights: it stays a float graph (cosines in float32 of fp16 hidden states)
            assert entry.precision == props["lladav.precision"] == "fp16" and not entry.quantization
            assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
            continue
        assert entry.precision == props["lladav.precision"] == "int8"
        consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        weights = acts = 0
        for n in model.graph.node:
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                continue
            scale, zero = consts[n.input[1]], consts[n.input[2]]
            assert scale.dtype == np.float16 and zero.dtype == np.int8 and not zero.any(), n.name
            if n.op_type == "DequantizeLinear" and n.input[0] in consts:
                w = consts[n.input[0]]
                axis = {a.name: a.i for a in n.attribute}.get("axis", 1)
                assert w.dtype == np.int8 and axis == 1 and scale.shape == (w.shape[1],), n.name
                weights += 1
            elif n.op_type == "QuantizeLinear":
                assert scale.shape == (), n.name
                acts += 1
        # decoder: q, k, v, o, gate, up, down per layer, each with its own activation Q/DQ pair (none shared)
        # vision: + the projector's two linears; the patch embedding (a Conv) stays float
        want = per_layer[name] * layers[name] + 2 * (name == "vision")
        assert weights == acts == want, (name, weights, acts, want)
        lm = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in consts
              and consts[n.input[1]].shape[-1] == m.model["decoder"]["vocab"]]
        assert len(lm) == (name == "decoder_post") and all(consts[n.input[1]].dtype == np.float16 for n in lm)
        q = entry.quantization
        assert q["scheme"]["mode"] == "int8" and q["calibration"]["counts"]["vision"] == 8
        # int8 against fp16 (scales and norms remain; vision: the patch Conv and position embeddings stay fp16)
        assert q["weight_bytes"] < (0.65 if name == "vision" else 0.55) * q["float_weight_bytes"]
        assert entry.data.bytes == q["weight_bytes"]


def test_int8_bundle_builds_strongly_typed_on_the_jetson(int8_bundle):
    """TensorRT: explicit quantization with strong typing; no precision flags beside it."""
    script = (int8_bundle / "jetson" / "build_engines.sh").read_text()
    assert script.count("--stronglyTyped") == 4  # the similarity graph's fp16 engine too
    assert "--int8" not in script and "--fp16" not in script


def test_the_int8_miniature_answers_above_the_floor(int8_bundle, tmp_path):
    """The harness runs an int8 bundle like any other (one more row per precision): the first 60
    held-out questions unpruned and at K=15 P=50 clear the fp32 floors of test_miniature."""
    from miniature.eval import main
    from tests.test_miniature import SHIPPED_FLOOR

    assert main(["--bundle", str(int8_bundle), "--limit", "60", "--strategies", "unpruned", "K15 P50",
                 "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "table.json").read_text())
    assert "(int8," in data["header"]
    rows = {r["name"]: r for r in data["rows"]}
    for name, floor in SHIPPED_FLOOR.items():
        assert rows[name]["accuracy"] >= floor, (name, rows[name]["by_kind"])


def test_calibration_records_what_each_graph_sees_and_is_reused_by_key(int8_bundle, tmp_path):
    from runtime.bundle import read_manifest

    m = read_manifest(int8_bundle)
    settings = CalibrationSettings(samples=2, steps_recorded=3)
    logs = []
    data = record_calibration(int8_bundle, settings, tmp_path, logs.append)
    assert data.meta["counts"]["vision"] == 2 and data.meta["model_hash"] == m.model["content_hash"]
    pre, post = data.feeds("decoder_pre"), data.feeds("decoder_post")
    assert 2 <= len(pre) <= 6 and len(post) == len(pre)
    full, reduced = pre[0]["inputs_embeds"].shape[1], post[0]["hidden_states"].shape[1]
    assert full == 184 + reduced - 92  # step 1: all 184 visual tokens; after it P=50 dropped 92
    assert pre[1]["inputs_embeds"].shape[1] == reduced and pre[0]["inputs_embeds"].dtype == np.float16
    again = record_calibration(int8_bundle, settings, tmp_path, logs.append)
    assert "reused" in logs[-1] and again.path == data.path
    loaded = load_calibration(data.path)
    for graph in ("vision", "decoder_pre", "decoder_post"):
        for a, b in zip(loaded.feeds(graph), data.feeds(graph)):
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    data.check_for(m.model["content_hash"], 15)
    with pytest.raises(LladaVError, match=r"recorded for model \w{12} K=15; this build is model \w{12} K=8"):
        data.check_for(m.model["content_hash"], 8)
    with pytest.raises(LladaVError, match="recorded for model"):
        data.check_for("0" * 64, 15)


def test_recorded_steps_are_step_one_and_spread_later_ones():
    assert recorded_steps(8, 1) == [0]
    assert recorded_steps(8, 3) == [0, 1, 7]
    assert recorded_steps(32, 4) == [0, 1, 16, 31]


def test_bad_calibration_inputs_are_named_and_nothing_is_written(int8_bundle, tmp_path):
    root = tmp_path / "root"
    images, prompts = tmp_path / "images", tmp_path / "prompts.txt"
    images.mkdir()
    prompts.write_text("What is ahead?\n")
    cases = [
        (CalibrationSettings(samples=0), "calibration samples: got 0; expected an integer >= 1"),
        (CalibrationSettings(images=str(images)), "--calib-images and --calib-prompts go together"),
        (CalibrationSettings(images=str(images), prompts=str(prompts)), "holds no images"),
    ]
    for settings, message in cases:
        with pytest.raises(LladaVError, match=message):
            record_calibration(int8_bundle, settings, root, quiet)
    (images / "frame.png").write_bytes(b"not a png")
    with pytest.raises(LladaVError, match=r"image '.*frame.png': unreadable"):
        record_calibration(int8_bundle, CalibrationSettings(images=str(images), prompts=str(prompts), samples=1), root, quiet)
    prompts.write_text("\n  \n")
    with pytest.raises(LladaVError, match="holds no questions"):
        record_calibration(int8_bundle, CalibrationSettings(images=str(images), prompts=str(prompts)), root, quiet)
    assert not root.exists() or not any(p.name.endswith(".json") for p in root.rglob("*"))


def test_quantization_settings_that_cannot_go_together_are_named():
    from dataclasses import replace

    from calib.quantize import INT4
    from calib.stage import QuantSettings

    cases = [
        (QuantSettings.for_mode("int4", quantize_vision=True), "quantize vision: asked for with int4; expected int8"),
        (QuantSettings.for_mode("int8", float_precision="bf16"), "float type: got 'bf16'; expected one of"),
        (QuantSettings(replace(INT4, smooth_alpha=0.5)), "SmoothQuant .* and AWQ .* both asked for"),
        (QuantSettings(replace(INT8, smooth_alpha=0.0, awq_grid=10)), "AWQ grid: got 10 for int8"),
    ]
    for settings, message in cases:
        with pytest.raises(LladaVError, match=message):
            settings.validate()


def _tiny_qdq(path, zero=0, weight_scale_shape=(3,), opset=19):
    """x (1, 4) fp16 -> Q/DQ -> MatMul with an int8 weight (4, 3) behind a DequantizeLinear (axis 1)."""
    inits = [numpy_helper.from_array(np.float16(0.1), "xs"), numpy_helper.from_array(np.int8(zero), "xz"),
             numpy_helper.from_array(np.arange(12, dtype=np.int8).reshape(4, 3), "w"),
             numpy_helper.from_array(np.full(weight_scale_shape, 0.01, np.float16), "ws"),
             numpy_helper.from_array(np.zeros(weight_scale_shape, np.int8), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="wdq", axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    return path


def test_qdq_check_refuses_what_tensorrt_refuses(tmp_path):
    assert check_qdq(_tiny_qdq(tmp_path / "ok.onnx"), INT8) == {"weights": 1, "activations": 1}
    with pytest.raises(QuantizationError, match="zero point .* TensorRT needs int8 zero points of 0"):
        check_qdq(_tiny_qdq(tmp_path / "asym.onnx", zero=3), INT8)
    with pytest.raises(QuantizationError, match=r"weight w is not int8 per output channel .*scale shape \(1,\)"):
        check_qdq(_tiny_qdq(tmp_path / "per_tensor_w.onnx", weight_scale_shape=(1,)), INT8)


def _two_linears(path: Path, d: int = 64) -> Path:
    """fp32, opset 19: x -> RMS-free q = x Wq, k = x Wk (two linears reading one input) -> q + k."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((d, d)) / d**0.5).astype(np.float32), n) for n in ("wq", "wk")]
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"), helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
             helper.make_node("Add", ["q", "k"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n", d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
    return path


def test_linears_sharing_an_input_get_dedicated_qdq_pairs_that_onnx_runtime_fuses(tmp_path):
    """Two linears reading one tensor: each gets its own Q/DQ pair (TensorRT shares none), check_qdq
    refuses a shared one, and with the runtime's session settings ONNX Runtime's CPU turns both into
    integer GEMMs (MatMulIntegerToFloat); with its default optimizers it merges the pairs and fuses neither."""
    import onnxruntime as ort

    from runtime.backends.ort import QDQ_DISABLED_OPTIMIZERS

    src, dst = _two_linears(tmp_path / "two.onnx"), tmp_path / "two_q.onnx"
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((1, 8, 64)).astype(np.float32)} for _ in range(2)]
    quantize_graph(src, dst, feeds, INT8, vocab=10)
    model = onnx.load(str(dst), load_external_data=False)
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(qs) == 2 and len({n.input[0] for n in qs}) == 1  # two pairs on the one input
    assert check_qdq(dst, INT8) == {"weights": 2, "activations": 2}
    fused = {}
    for label, disabled in (("runtime", QDQ_DISABLED_OPTIMIZERS), ("default", [])):
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(tmp_path / f"{label}.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(str(dst), opts, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
        ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath, load_external_data=False).graph.node]
        fused[label] = ops.count("MatMulIntegerToFloat")
    assert fused == {"runtime": 2, "default": 0}
    # one DQ output read by both linears: refused
    shared = onnx.load(str(dst), load_external_data=True)
    dq = [n for n in shared.graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in
          {t.name for t in shared.graph.initializer}]
    for n in shared.graph.node:
        if n.op_type == "MatMul" and dq[1].output[0] in n.input:
            n.input[0] = dq[0].output[0]
    onnx.save(shared, str(tmp_path / "shared.onnx"))
    with pytest.raises(QuantizationError, match="feed more than one node; expected a dedicated Q/DQ pair"):
        check_qdq(tmp_path / "shared.onnx", INT8)


def test_quantize_graph_refuses_graphs_it_cannot_take(int8_bundle, tmp_path):
    feeds = [{"x": np.ones((1, 4), np.float16)}]
    with pytest.raises(QuantizationError, match="opset 18; int8 Q/DQ with float16 scales needs opset >= 19"):
        quantize_graph(_tiny_qdq(tmp_path / "o18.onnx", opset=18), tmp_path / "out.onnx", feeds, INT8, 512)
    src = tmp_path / "pre"
    src.mkdir()
    for suffix in ("", ".data"):
        shutil.copy(int8_bundle / "onnx" / f"decoder_pre.onnx{suffix}", src / f"decoder_pre.onnx{suffix}")
    with pytest.raises(QuantizationError, match="already holds Q/DQ nodes; expected a float graph"):
        quantize_graph(src / "decoder_pre.onnx", tmp_path / "out.onnx", feeds, INT8, 512)
    with pytest.raises(LladaVError, match="no calibration feeds"):
        quantize_graph(src / "decoder_pre.onnx", tmp_path / "out.onnx", [], INT8, 512)
    assert not (tmp_path / "out.onnx").exists()


def test_compare_reports_agreement_overlap_and_logits_error_against_the_reference(int8_bundle, tmp_path, capsys):
    """calib.compare over an fp32 reference and the int8 bundle: the reference against itself is exact; the
    int8 rows carry a small, non-zero step-1 logits error and an overlap of the kept tokens; bundles of
    another model are refused by name."""
    from calib.compare import main
    from export.build import BuildRequest, build_bundle
    from export.profiles import ProfileSettings
    from runtime.bundle import read_manifest

    m = read_manifest(int8_bundle)
    ref = build_bundle(BuildRequest(Path(m.model["source"]), tmp_path / "fp32", 15, 50, "fp32",
                                    ProfileSettings.from_dict(m.profiles["settings"])), log=quiet).out
    assert main(["--bundles", str(ref), str(int8_bundle), "--limit", "3", "--out", str(tmp_path / "cmp")]) == 0
    rows = {(r["bundle"].split(" ")[-1], r["strategy"]): r for r in
            json.loads((tmp_path / "cmp" / "precision.json").read_text())["rows"]}
    assert set(rows) == {(p, s) for p in ("(fp32)", "(int8)") for s in ("unpruned", "K15 P50")}
    for s in ("unpruned", "K15 P50"):
        exact = rows["(fp32)", s]
        assert exact["agreement"] == exact["kept_overlap_min"] == 1.0 and exact["logits_rel_error_max"] == 0.0
        q = rows["(int8)", s]
        assert 0 < q["logits_rel_error_mean"] <= q["logits_rel_error_max"] < 0.2 and q["questions"] == 3
        assert 0.8 <= q["kept_overlap_min"] <= q["kept_overlap_mean"] <= 1.0
    assert rows["(int8)", "unpruned"]["kept_overlap_min"] == 1.0  # nothing pruned: every token kept by both



def test_compare_refuses_bundles_of_different_models(int8_bundle, runtime_bundles, tmp_path, capsys):
    from calib.compare import main

    assert main(["--bundles", str(runtime_bundles[15]), str(int8_bundle), "--out", str(tmp_path)]) == 2
    assert "--bundles: built from different models" in capsys.readouterr().err
    assert not (tmp_path / "precision.json").exists()


def outlier_post_feeds(model) -> list[dict]:
    """Two decoder_post feeds (K=15, 40 and 56 rows, no cached K/V) whose channel 3 is 30x the others:
    an outlier channel, as LLMs have."""
    d = model.cfg.decoder
    rng = np.random.default_rng(0)
    feeds = []
    for n in (40, 56):
        h = rng.standard_normal((1, n, d.d_model)).astype(np.float32)
        h[..., 3] *= 30
        kv = np.zeros((d.n_layers - 15, 1, d.n_heads, 0, d.d_head), np.float32)
        feeds.append({"hidden_states": h, "position_ids": np.arange(n)[None], "logit_rows": np.arange(n - 8, n),
                      "past_keys": kv, "past_values": kv})
    return feeds


def test_smoothquant_migration_keeps_the_function_and_divides_the_activations():
    """calib.smooth on a random 32-layer model (layers 15..31, decoder_post's half): the hooks' maxima
    equal max |RMSNorm(h)| computed directly at a layer's input; after smoothing, decoder_post's logits
    are unchanged (fp32, relative 1e-4) while every smoothed input channel's maximum is a_j / s_j."""
    import torch

    from calib.smooth import input_maxima, scales, smooth
    from export.model import PRESETS, LladaV
    from export.subgraphs import DECODER_POST

    torch.manual_seed(0)
    model = LladaV(PRESETS["tiny"]).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.copy_(torch.rand_like(p) * 2 + 0.1)
    feeds = outlier_post_feeds(model)
    blocks = {i: model.model.layers[i] for i in range(15, 32)}
    names = DECODER_POST.input_names
    module = DECODER_POST.build(model, 15)
    with torch.no_grad():
        maxima = input_maxima(module, blocks, feeds, names)
        direct = torch.stack([model.model.layers[20].input_layernorm(
            model.run_layers(torch.from_numpy(f["hidden_states"]), torch.from_numpy(f["position_ids"]), 15, 20)[0]
        ).abs().reshape(-1, model.cfg.decoder.d_model).amax(0) for f in feeds]).amax(0)
        assert torch.allclose(maxima[20, "q"], direct, rtol=1e-5) and torch.equal(maxima[20, "q"], maxima[20, "v"])
        before = [module(*[torch.from_numpy(f[n]) for n in names])[0] for f in feeds]
        w = [model.model.layers[20].self_attn.q_proj.weight.clone(), model.model.layers[20].self_attn.k_proj.weight.clone(),
             model.model.layers[20].self_attn.v_proj.weight.clone()]
        s = scales(maxima[20, "q"], w, 0.5)
        smooth(blocks, maxima, 0.5)
        after = [module(*[torch.from_numpy(f[n]) for n in names])[0] for f in feeds]
        for a, b in zip(before, after):
            assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())
        again = input_maxima(module, blocks, feeds, names)
        assert torch.allclose(again[20, "q"], maxima[20, "q"] / s, rtol=1e-4)
        assert float(again[20, "q"].max() / again[20, "q"].median()) < float(maxima[20, "q"].max() / maxima[20, "q"].median())


def test_jetson_latencys_an_int8_bundle_like_any_other(int8_bundle, tmp_path, capsys):
    """The on-target profiler plans an int8 bundle's engines (dry run: every trtexec command printed) and its
    ONNX Runtime path runs the quantized graphs."""
    from jetson.latency import main

    assert main(["--bundle", str(int8_bundle), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert text.count("--loadEngine=") >= 3 and "decoder_pre" in text and "decoder_post" in text
    assert main(["--bundle", str(int8_bundle), "--backend", "onnxruntime", "--steps", "2", "--repeats", "1",
                 "--iterations", "1", "--p", "50", "--out", str(tmp_path / "prof")]) == 0
    assert (tmp_path / "prof" / "report.md").is_file()


@pytest.fixture(scope="module")
def int4_bundle(int8_bundle):
    """The shipped miniature as an int4 bundle at K=15 (the int8 bundle's calibration data reused)."""
    from calib.stage import QuantSettings
    from export.build import BuildRequest, build_bundle
    from export.profiles import ProfileSettings
    from miniature import embedded_checkpoint

    profile = ProfileSettings(layout="anyres", max_text_tokens=96, opt_text_tokens=64, max_response=32,
                              opt_response=8, opt_image=(640, 360))
    q = QuantSettings.for_mode("int4", calibration=CalibrationSettings(samples=8),
                               data_root=int8_bundle.parent / "calibration")
    return build_bundle(BuildRequest(embedded_checkpoint(), int8_bundle.parent / "int4", 15, 50, "int4", profile, quant=q),
                        log=quiet).out


def test_int4_bundle_holds_blocked_int4_weights_that_round_the_checkpoints(int4_bundle):
    """Every decoder linear is an INT4 initializer behind DequantizeLinear(axis 0, block_size 128) with float16
    scales per block and output column, and no activation is quantized; the graphs are opset 21; the decoders'
    weight bytes are under 0.3x their fp16 size. AWQ's scales fold into RMSNorm's weight: for layer 0's
    q_proj, norm'_j * dequantized W'[j, :] is the checkpoint's norm_j * W[:, j] within half a step of its
    block (times norm'_j), and the search moved the scales (norm' differs from the checkpoint's norm)."""
    import torch
    from safetensors.torch import load_file

    from miniature import embedded_checkpoint
    from runtime.bundle import read_manifest

    m = read_manifest(int4_bundle)
    assert m.precision == "int4" and m.opset == 21
    vision = _graph(int4_bundle, "vision")  # the default: the vision tower stays fp16
    assert m.subgraphs["vision"].precision == "fp16" and not m.subgraphs["vision"].quantization
    assert not [n for n in vision.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    ckpt = {}
    for f in sorted(embedded_checkpoint().glob("*.safetensors")):
        ckpt.update(load_file(str(f)))
    layers = {"decoder_pre": 15, "decoder_post": 17}
    for name in layers:
        model = _graph(int4_bundle, name)
        assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [21]
        assert not [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
        consts = {t.name: t for t in model.graph.initializer}
        dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
        assert len(dqs) == 7 * layers[name]
        for n in dqs:
            attrs = {a.name: a.i for a in n.attribute}
            w, s = consts[n.input[0]], numpy_helper.to_array(consts[n.input[1]])
            assert w.data_type == TensorProto.INT4 and attrs == {"axis": 0, "block_size": 128} and len(n.input) == 2
            assert s.dtype == np.float16 and s.shape == (w.dims[0] // 128, w.dims[1])
        e = m.subgraphs[name]
        assert e.precision == "int4" and e.quantization["weight_bytes"] < 0.3 * e.quantization["float_weight_bytes"]
    model = _graph(int4_bundle, "decoder_pre")
    consts = {t.name: t for t in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.name == "/layers.0/self_attn/q_proj/MatMul_dq")
    q = numpy_helper.to_array(consts[dq.input[0]]).astype(np.float32)
    s = numpy_helper.to_array(consts[dq.input[1]]).astype(np.float32)
    assert q.min() >= -8 and q.max() <= 7
    norm = numpy_helper.to_array(consts["model.model.layers.0.input_layernorm.weight"]).astype(np.float32)[:, None]
    ckpt_norm = ckpt["model.layers.0.input_layernorm.weight"].float().numpy()[:, None]
    want = ckpt_norm * ckpt["model.layers.0.self_attn.q_proj.weight"].float().numpy().T  # (in, out), as the graph computes
    got = norm * q * np.repeat(s, 128, axis=0)
    step = norm * np.repeat(s, 128, axis=0)
    assert np.all(np.abs(got - want) <= step * 0.5 + 2e-3 * np.abs(want).max())
    assert np.abs(norm - ckpt_norm).max() > 1e-2 * np.abs(ckpt_norm).max()
    awq = m.subgraphs["decoder_pre"].quantization["awq"]
    assert len(awq["alphas"]) == 4 * 15 and awq["output_error_awq"] <= awq["output_error_rtn"]


def test_int4_rules_refuse_activation_qdq_and_unblocked_weights(tmp_path):
    from calib.quantize import INT4

    with pytest.raises(QuantizationError, match="on an activation; int4 is weight-only"):
        check_qdq(_tiny_qdq(tmp_path / "w8a8.onnx"), INT4)


def test_awq_fake_quantizer_is_the_int4_graphs_rounding():
    """calib.awq measures its error with the rounding calib.int4 stores: fake_int4(W) (out, in) equals
    blocked_int4's q * scale of W^T (in, out), exactly."""
    import torch

    from calib.awq import fake_int4
    from calib.int4 import blocked_int4

    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    w[:, 7] *= 40
    q, scale = blocked_int4(w.numpy().T, 128)
    want = q.astype(np.float32) * np.repeat(scale, 128, axis=0)
    assert np.array_equal(fake_int4(w, 128).numpy().T, want)


def test_awq_keeps_the_function_and_beats_round_to_nearest():
    """calib.awq on a random 32-layer model (decoder_post's half) with an outlier input channel: before
    quantization the folded scales leave decoder_post's logits unchanged (fp32, relative 1e-4); the search
    ends below round to nearest in summed INT4 output error on the calibration rows, with alpha > 0 chosen
    somewhere; that sum, recomputed here from the folded weights (s = W'/W) and the recorded rows, agrees."""
    import torch

    from calib.awq import GROUPS, awq, fake_int4, group_inputs
    from calib.smooth import linears
    from export.model import PRESETS, LladaV
    from export.subgraphs import DECODER_POST

    torch.manual_seed(0)
    model = LladaV(PRESETS["tiny"]).float().eval()
    feeds = outlier_post_feeds(model)
    blocks = {i: model.model.layers[i] for i in range(15, 32)}
    names = DECODER_POST.input_names
    module = DECODER_POST.build(model, 15)
    block = 64
    with torch.no_grad():
        before = [module(*[torch.from_numpy(f[n]) for n in names])[0] for f in feeds]
        original = {i: {k: v.weight.clone() for k, v in linears(b).items()} for i, b in blocks.items()}
        stats = group_inputs(module, blocks, feeds, names)
        found = awq(blocks, stats, block, grid=10)
        after = [module(*[torch.from_numpy(f[n]) for n in names])[0] for f in feeds]
        for a, b in zip(before, after):
            assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())
        assert len(found["alphas"]) == len(GROUPS) * 17
        assert found["output_error_awq"] < found["output_error_rtn"] and max(found["alphas"].values()) > 0
        total = 0.0
        for i, b in blocks.items():
            lin = linears(b)
            s = {g[0]: lin[g[0]].weight[0] / original[i][g[0]][0] for g in GROUPS}  # each group's input scales
            rows = {"v": s["o"], "up": s["down"]}  # v's and up's output rows carry 1 / s of the next group
            for group in GROUPS:
                x = stats.sample((i, group[0]))
                for name in group:
                    y = (x / s[group[0]]) @ fake_int4(lin[name].weight, block).T * rows.get(name, 1)
                    total += float((y - x @ original[i][name].T).pow(2).sum())
        # the search measured v and up before o's and down's scales moved into their rows (fp16 scale rounding differs)
        assert abs(total - found["output_error_awq"]) <= 1e-3 * found["output_error_awq"]


def test_quantization_flags_are_checked_before_any_export(tiny_dir, tmp_path, capsys, monkeypatch):
    """--smooth-alpha 1.5 and an empty --calib-images folder were refused only after minutes of export
    and calibration."""
    import export.build as build_mod
    from export.build_engines import main

    monkeypatch.setattr(build_mod.GraphExport, "run", lambda *a, **k: pytest.fail("exported before checking"))
    images, prompts = tmp_path / "images", tmp_path / "q.txt"
    images.mkdir()
    prompts.write_text("What is ahead?\n")
    base = ["--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--precision", "int8"]
    assert main(base + ["--smooth-alpha", "1.5"]) == 2
    assert "smooth alpha: got 1.5; expected a value in [0, 1)" in capsys.readouterr().err
    assert main(base + ["--calib-images", str(images), "--calib-prompts", str(prompts)]) == 2
    assert "holds no images" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
