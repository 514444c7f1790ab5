"""Quantization for Orin (docs/quantization.md): calibration data recorded from the real pipeline
(`data`), INT8 W8A8 Q/DQ of the decoders by TensorRT's rules (`quantize`, with SmoothQuant's scale
migration in `smooth`), INT4 weight-only blocked Q/DQ (`int4`, with AWQ's scale search in `awq`),
the graph helpers both share (`graph`), the bundle build's stage behind `--precision int8|int4`
(`stage`), and the precision comparison on the held-out questions (`compare`)."""
