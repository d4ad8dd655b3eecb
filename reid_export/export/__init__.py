"""Export: checkpoint -> ONNX (FP32, data config inside), annotate foreign ONNX, FP16 / INT8 (Q/DQ) variants."""

from .metadata import load_onnx, read_data_config, require_data_config, save_onnx

__all__ = ["load_onnx", "read_data_config", "require_data_config", "save_onnx"]
