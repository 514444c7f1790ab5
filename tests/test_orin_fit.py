"""bench.orin_fit: the 8B's weight bytes per graph and precision, and what fits on which Orin."""

from __future__ import annotations

from bench.orin_fit import GraphParams, decoder_activation_bytes, kv_buffer_bytes, param_counts, report, weight_bytes


def test_the_8b_parameter_counts_match_its_architecture():
    """32 layers of 4 d^2 + 3 d m linear weights (d 4096, m 12288), two RMSNorm weights each; the LM head
    and the embeddings are vocab x d; the SigLIP so400m tower (~0.4B) with the projector."""
    c = param_counts(15)
    d, m, vocab = 4096, 12288, 126464
    per_layer = 4 * d * d + 3 * d * m
    assert c["decoder_pre"].linear == 15 * per_layer and c["decoder_post"].linear == 17 * per_layer
    assert c["decoder_pre"].other == 15 * 2 * d
    assert c["decoder_post"].other == 17 * 2 * d + d + vocab * d
    assert c["decoder_pre"].out_channels == 15 * (4 * d + 2 * m + d)
    assert c["host embeddings"].other == vocab * d + d
    assert 0.40e9 < c["vision"].other < 0.45e9


def test_bytes_per_precision_follow_the_schemes():
    g = GraphParams(linear=1024 * 256, out_channels=256, other=1000)
    assert weight_bytes(g, "fp16") == 2 * (1024 * 256 + 1000)
    assert weight_bytes(g, "int8") == 1024 * 256 + 2 * 256 + 2 * 1000
    assert weight_bytes(g, "int4") == 1024 * 256 / 2 + 2 * 1024 * 256 / 128 + 2 * 1000
    fused, unfused = decoder_activation_bytes(100, 8, 16, 2)
    assert fused == 2 * (6 * 100 * 8 + 3 * 100 * 16) and unfused - fused == 2 * 100 * 100 * 6


def test_report_says_what_fits_where():
    text = report(15, 4758, 37, 3649, 50, 64)
    assert "decoder (int4) / decoder (fp16): 0.309" in text  # the fp16 LM head keeps int4 above 0.3x
    rows = {line.split("  ")[0]: line for line in text.splitlines()
            if line.startswith(("AGX", "Orin NX", "Orin Nano")) and "does not fit" in line}
    assert "!" not in rows["AGX Orin 64GB"].split("(")[0]
    nx = rows["Orin NX 16GB"].split()
    fp16, int8, int4 = nx[3:6]
    # the K/V buffers (present + cached, 2 x 2.49 GB at seq 4758) count: nothing fits the NX at the default maxima
    assert fp16 == "26.6!/37.2!" and int8 == "19.6!/30.2!" and int4 == "16.2!/26.8!"
    assert "K/V buffers at seq 4758: 2.49 GB of present K/V" in text and "= 4.99 GB" in text
    assert rows["Orin Nano 8GB"].split("(")[0].count("!") == 6
    camera = report(15, 4033, 16, 3649, 50, 64)  # engines sized for 1920x1080 frames (--max-image)
    nx = next(line for line in camera.splitlines() if line.startswith("Orin NX")).split()
    assert nx[3:6] == ["25.1!/32.1!", "18.1!/25.1!", "14.7/21.8!"]  # int4 fits with fused attention


def test_kv_buffer_bytes():
    assert kv_buffer_bytes(4758, 32, 4096) == 2 * 32 * 4758 * 4096 * 2  # keys and values, fp16
