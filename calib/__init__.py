"""Calibration data and quantization for Orin (INT8 / INT4 weight-only): a later issue."""
