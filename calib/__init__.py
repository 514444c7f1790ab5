"""Quantization for Orin (docs/quantization.md): calibration data recorded from the real pipeline
(`data`), INT8 W8A8 Q/DQ of the decoders by TensorRT's rules (`quantize`), and the bundle build's
stage that ties them together behind `--precision int8` (`stage`)."""
