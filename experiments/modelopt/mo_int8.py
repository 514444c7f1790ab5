"""(ModelOpt venv) INT8 of the miniature's fp32 decoder graphs with ModelOpt's ONNX PTQ, on the same feeds."""
import glob, sys, time
import numpy as np, onnx
from modelopt.onnx.quantization import quantize
from onnxruntime.quantization.calibrate import CalibrationDataReader

class Reader(CalibrationDataReader):
    def __init__(self, name):
        self.files = sorted(glob.glob(f"/tmp/mo/work/{name}_*.npz")); self.i = 0
    def get_next(self):
        if self.i >= len(self.files): return None
        f = np.load(self.files[self.i]); self.i += 1
        return {k: f[k] for k in f.files}
    def rewind(self): self.i = 0
    def get_first(self):
        f = np.load(self.files[0]); return {k: f[k] for k in f.files}

for name in ("decoder_pre", "decoder_post"):
    src = f"/tmp/mo/work/in/{name}.onnx"
    m = onnx.load(src, load_external_data=False)
    inits = {t.name: list(t.dims) for t in m.graph.initializer}
    lm = [n.name for n in m.graph.node if n.op_type == "MatMul" and inits.get(n.input[1], [0])[-1:] == [m_v] ] if False else []
    import json
    vocab = json.load(open("/work/main/bundles/miniature-k15-p50-fp32/manifest.json"))["model"]["decoder"]["vocab"]
    lm = [n.name for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits and inits[n.input[1]][-1] == vocab]
    print(name, "excluded (LM head):", lm, flush=True)
    t = time.time()
    quantize(onnx_path=src, quantize_mode="int8", calibration_data_reader=Reader(name), calibration_method="max",
             calibration_eps=["cpu"], nodes_to_exclude=lm or None, disable_mha_qdq=True, op_types_to_quantize=(sys.argv[1].split(",") if len(sys.argv) > 1 else None), high_precision_dtype="fp16",
             use_external_data_format=True, output_path=f"/tmp/mo/work/out/{name}.onnx")
    print(name, "quantized in", round(time.time() - t, 1), "s", flush=True)
