"""(project env) a bundle whose decoders are ModelOpt's int8 graphs: the int8-fp32 bundle's other files,
the graphs re-saved with our external-data name and their identity, the manifest updated and re-digested."""
import dataclasses, shutil, sys
from pathlib import Path
import onnx
from export.onnx_export import consolidate_external_data
from runtime.bundle import file_info, read_manifest, write_manifest

src, dst = Path("bundles/miniature-k15-p50-int8-fp32"), Path(sys.argv[2])
shutil.rmtree(dst, ignore_errors=True)
shutil.copytree(src, dst)
m = read_manifest(dst)
for name in ("decoder_pre", "decoder_post"):
    ours = onnx.load(str(src / "onnx" / f"{name}.onnx"), load_external_data=False)
    def stamp(model, ours=ours):
        del model.metadata_props[:]
        for p in ours.metadata_props:
            q = model.metadata_props.add(); q.key, q.value = p.key, p.value
    path = dst / "onnx" / f"{name}.onnx"
    for suffix in ("", ".data"):
        path.with_name(path.name + suffix).unlink()
    consolidate_external_data(Path(f"/tmp/mo/work/out/{name}.onnx"), path, edit=stamp)
    e = m.subgraphs[name]
    q = dict(e.quantization, scheme=dict(e.quantization["scheme"], tool=sys.argv[1]))
    m.subgraphs[name] = dataclasses.replace(e, onnx=file_info(dst, path), data=file_info(dst, path.with_name(path.name + ".data")), quantization=q)
write_manifest(dst, m)
print("assembled", dst)
