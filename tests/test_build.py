"""build_engines: profiles, trtexec commands, the manifest, reuse, atomicity and bad arguments."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from export import build as build_mod
from export.build import BuildRequest, build_bundle, summary
from export.build_engines import main
from export.model import PRESETS
from export.profiles import ProfileSettings, axis_ranges, build_script, input_shapes, trtexec_command
from export.subgraphs import DECODER_PRE, SUBGRAPHS, VISION
from runtime.bundle import Manifest, read_manifest, verify_files
from runtime.errors import LladaVError

REAL = PRESETS["llada-v-8b"]
QUICK = ProfileSettings(layout="single", max_text_tokens=160, opt_text_tokens=100, max_response=32, opt_response=16)


def quiet(_msg):
    pass


def test_profile_ranges_cover_full_and_reduced_sequences():
    s = ProfileSettings()  # anyres, 256/96 text, 128/32 response, tuned for 1920x1080
    r = axis_ranges(REAL, s, 50)
    assert r["seq"] == (1, 96 + 3649 - 1824 + 32, 256 + 4374 + 128)  # opt: the reduced 1920x1080 sequence
    assert r["tiles"] == (1, 16, 37) and r["batch"] == (1, 1, 1)
    assert r["query"] == (1, 32, 384) and r["rows"] == (1, 32, 128)
    single = axis_ranges(REAL, replace(s, layout="single", max_batch=2), 70)
    assert single["tiles"] == (1, 1, 1) and single["batch"] == (1, 1, 2)
    assert single["seq"] == (1, 96 + 729 - 510 + 32, 256 + 729 + 128)


def test_input_shapes_and_trtexec_command():
    r = axis_ranges(REAL, ProfileSettings(layout="single"), 50)
    shapes = input_shapes(DECODER_PRE, REAL, r)
    reduced = 96 + 729 - 729 * 50 // 100 + 32
    assert shapes["inputs_embeds"] == {"min": [1, 1, 4096], "opt": [1, reduced, 4096], "max": [1, 1113, 4096]}
    cmd = trtexec_command("onnx/decoder_pre.onnx", "engines/decoder_pre.engine", shapes, "fp16", "engines/t.cache", "trtexec")
    assert cmd[:4] == ["trtexec", "--onnx=onnx/decoder_pre.onnx", "--saveEngine=engines/decoder_pre.engine", "--stronglyTyped"]
    assert "--minShapes=inputs_embeds:1x1x4096,position_ids:1x1,score_rows:1" in cmd
    assert f"--optShapes=inputs_embeds:1x{reduced}x4096,position_ids:1x{reduced},score_rows:32" in cmd
    assert "--maxShapes=inputs_embeds:1x1113x4096,position_ids:1x1113,score_rows:384" in cmd
    assert "--timingCacheFile=engines/t.cache" in cmd and any(a.startswith("--memPoolSize=workspace:") for a in cmd)
    fp32 = trtexec_command("a.onnx", "a.engine", input_shapes(VISION, REAL, r), "fp32", "c", "trtexec")
    assert "--stronglyTyped" not in fp32 and "--fp16" not in fp32
    script = build_script({"vision": trtexec_command("a.onnx", "a.engine", input_shapes(VISION, REAL, r), "fp32", "c")})
    assert '"$TRTEXEC"' in script and "--saveEngine=a.engine.tmp" in script and "mv a.engine.tmp a.engine" in script


@pytest.fixture(scope="module")
def bundle(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "b"
    req = BuildRequest(tiny_dir, out, k=15, p=50, precision="fp32", profiles=QUICK)
    return req, build_bundle(req, log=quiet)


def test_bundle_contents_and_manifest(bundle, tiny, tokenizer):
    req, result = bundle
    _, ckpt = tiny
    m = read_manifest(req.out)
    verify_files(req.out, m)
    assert m.k == 15 and m.p == 50 and m.n_layers == 32 and m.precision == "fp32"
    assert m.model["content_hash"] == ckpt.content_hash()
    assert m.token_ids == tokenizer.ids.to_dict()
    assert set(m.subgraphs) == {"vision", "decoder_pre", "decoder_post"}
    for spec in SUBGRAPHS:
        e = m.subgraphs[spec.name]
        assert [t.name for t in e.inputs] == spec.input_names and [t.name for t in e.outputs] == spec.output_names
        assert set(e.shapes) == set(spec.input_names) and e.validation
    assert m.profiles["axes"]["seq"] == [1, 100 + 729 - 364 + 16, 160 + 729 + 32]
    assert m.versions["torch"] and m.versions["onnx"] and m.versions["onnxruntime"]
    assert m.tensorrt["built"] is False and "TensorRT" in m.tensorrt["reason"]
    script = (req.out / m.tensorrt["script"]).read_text()
    assert script.count("--onnx=") == 3 and "--maxShapes=hidden_states:1x921x64" in script
    assert (req.out / "tokenizer" / "tokenizer.json").is_file() and (req.out / "host" / "embed_tokens.npy").is_file()
    text = summary(result)
    assert "onnx/decoder_pre.onnx" in text and "not built" in text and "build_engines.sh" in text


def test_manifest_round_trip(bundle):
    req, _ = bundle
    raw = json.loads((req.out / "manifest.json").read_text())
    assert Manifest.from_dict(raw).to_dict() == raw
    with pytest.raises(LladaVError, match="format_version"):
        Manifest.from_dict({**raw, "format_version": 99})


def test_corrupt_bundle_is_refused(bundle, tmp_path):
    req, _ = bundle
    copy = tmp_path / "copy"
    shutil.copytree(req.out, copy)
    data = copy / "onnx" / "decoder_post.onnx.data"
    blob = bytearray(data.read_bytes())
    blob[100] ^= 0xFF
    data.write_bytes(bytes(blob))
    with pytest.raises(LladaVError, match="decoder_post.onnx.data is corrupt"):
        verify_files(copy, read_manifest(copy))
    data.unlink()
    with pytest.raises(LladaVError, match="decoder_post.onnx.data is missing"):
        verify_files(copy, read_manifest(copy))


def test_rerun_reuses_and_k_change_reexports_only_decoders(bundle, tmp_path):
    req, _ = bundle
    out = tmp_path / "again"
    shutil.copytree(req.out, out)
    same = build_bundle(replace(req, out=out, p=70), log=quiet)
    assert same.reused == ["vision", "decoder_pre", "decoder_post"] and same.exported == []
    assert same.manifest.p == 70 and same.manifest.profiles["axes"]["seq"][1] == 100 + 729 - 510 + 16
    moved = build_bundle(replace(req, out=out, k=3), log=quiet)
    assert moved.reused == ["vision"] and moved.exported == ["decoder_pre", "decoder_post"]
    verify_files(out, read_manifest(out))


def test_interrupted_build_leaves_the_old_bundle(bundle, tmp_path, monkeypatch):
    req, _ = bundle
    out = tmp_path / "kept"
    shutil.copytree(req.out, out)
    before = (out / "manifest.json").read_text()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod, "export_and_validate", boom)
    with pytest.raises(KeyboardInterrupt):
        build_bundle(replace(req, out=out, k=7), log=quiet)
    assert (out / "manifest.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]  # no temporary directory left behind
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        build_bundle(replace(req, out=fresh), log=quiet)
    assert not fresh.exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--k", "0"], "K: got 0; expected an integer layer index in 1..31"),
        (["--k", "32"], "K: got 32"),
        (["--p", "100"], r"P: got 100.0; expected a percentage in [0, 100)"),
        (["--p", "-1"], "P: got -1.0"),
        (["--precision", "int8"], "int8 needs explicit Q/DQ quantization"),
        (["--opt-text-tokens", "300"], "opt_text_tokens=300, max_text_tokens=256"),
    ],
)
def test_bad_arguments_fail_before_heavy_work(tiny_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(["--model", str(tiny_dir), "--out", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bad_checkpoints_and_outputs(tiny_dir, tmp_path, capsys):
    assert main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "not a directory" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "config.json").write_text("{")
    assert main(["--model", str(broken), "--out", str(tmp_path / "o")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["--model", str(tiny_dir), "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["--model", str(tiny_dir), "--out", str(tmp_path / "busy")]) == 2
    assert "refusing to replace it" in capsys.readouterr().err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_engines_required_without_tensorrt(tiny_dir, tmp_path, capsys):
    from export.trt_build import tensorrt_status

    usable, why, _ = tensorrt_status()
    if usable:
        pytest.skip("TensorRT and a GPU are present: the 'required' path succeeds here")
    out = tmp_path / "o"
    argv = ["--model", str(tiny_dir), "--out", str(out), "--layout", "single", "--max-response", "16",
            "--opt-response", "8", "--precision", "fp32", "--engines", "require"]
    assert main(argv) == 2
    assert f"engines: required, but {why}" in capsys.readouterr().err
    assert not out.exists()


def test_tensorrt_engines_build_and_match(tiny_dir, tmp_path):
    from export.trt_build import tensorrt_status

    usable, why, _ = tensorrt_status()
    if not usable:
        pytest.skip(f"needs TensorRT and a GPU: {why}")
    req = BuildRequest(tiny_dir, tmp_path / "trt", k=15, p=50, precision="fp16", profiles=QUICK, engines="require")
    result = build_bundle(req, log=quiet)
    for e in result.manifest.subgraphs.values():
        assert e.engine is not None and e.engine_check
    verify_files(req.out, result.manifest)


def test_engine_reuse_needs_same_onnx_profile_and_tensorrt(bundle, tmp_path):
    from export.build import reusable_engine

    req, result = bundle
    old = read_manifest(req.out)
    old.tensorrt["version"] = "10.3.0"
    entry = old.subgraphs["decoder_pre"]
    assert reusable_engine(old, entry, replace(entry), "10.3.0")
    assert not reusable_engine(old, entry, replace(entry), "10.7.0")  # engines are tied to the TensorRT version
    other_profile = replace(entry, shapes={**entry.shapes, "score_rows": {"min": [1], "opt": [9], "max": [99]}})
    assert not reusable_engine(old, entry, other_profile, "10.3.0")
    other_onnx = replace(entry, onnx=replace(entry.onnx, sha256="0" * 64))
    assert not reusable_engine(old, entry, other_onnx, "10.3.0")


def test_reuse_leaves_the_previous_manifest_untouched(bundle, tmp_path):
    """Reused ONNX entries are copies: the previous manifest keeps its shapes (and engines)."""
    from export.build import Builder
    from export.checkpoint import open_checkpoint

    req, _ = bundle
    ckpt = open_checkpoint(req.model_dir)
    b = Builder(replace(req, p=70), ckpt, quiet)
    before = b.old.subgraphs["decoder_pre"].shapes
    (tmp_path / "onnx").mkdir()
    from export.build import exporter_source_hash
    from export.profiles import axis_ranges
    from export.subgraphs import DECODER_PRE as spec

    entry = b.subgraph(tmp_path, spec, ckpt.content_hash(), exporter_source_hash(), axis_ranges(ckpt.config, QUICK, 70))
    assert b.reused == ["decoder_pre"] and entry is not b.old.subgraphs["decoder_pre"]
    assert b.old.subgraphs["decoder_pre"].shapes == before != entry.shapes
