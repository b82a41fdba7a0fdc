"""Quantization, compression and the artifact: plain PyTorch, no Lightning.

quantizers.py (the registry: a quantizer by name, ``TensorRule``), rtn.py (per-row intN round to nearest), gptq.py,
hessians.py and calibration.py (GPTQ inputs), prune.py
(selective ±1 pruning), compress.py (byte shuffle + codecs), quantized.py (the quantized state dict),
artifact.py (native and upstream containers), code_size.py (honest code bytes), export.py (the whole export).
"""

from pgolf_lit.quant.artifact import read_upstream_artifact
from pgolf_lit.quant.code_size import CodeSize, measure_code_size
from pgolf_lit.quant.export import (
    ExportConfig,
    ExportReport,
    TensorRule,
    build_model_from_artifact,
    dequantize,
    export_model,
    load_artifact,
    model_from_artifact,
    quantize_state_dict,
    read_artifact,
)
from pgolf_lit.quant.hessians import collect_hessians

__all__ = [
    "CodeSize",
    "ExportConfig",
    "ExportReport",
    "TensorRule",
    "build_model_from_artifact",
    "collect_hessians",
    "dequantize",
    "export_model",
    "load_artifact",
    "measure_code_size",
    "model_from_artifact",
    "quantize_state_dict",
    "read_artifact",
    "read_upstream_artifact",
]
