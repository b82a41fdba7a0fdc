"""Quantization, compression and the artifact: plain PyTorch, no Lightning.

quantizers.py (the registry: a quantizer by name, ``TensorRule``), rtn.py (per-row intN round to nearest), gptq.py,
hessians.py and calibration.py (GPTQ inputs), prune.py
(selective ±1 pruning), compress.py (byte shuffle + codecs), quantized.py (the quantized state dict),
artifact.py (writing the native and upstream containers), reader.py (reading any artifact back: each container
registers its reader, native_read.py, upstream_read.py, pergroup_read.py, pergroup_v2_read.py), code_size.py
(honest code bytes), export.py (the whole export). Importing this package registers every container.
"""

from pgolf_lit.quant import native_read, pergroup_read, pergroup_v2_read, upstream_read  # noqa: F401  (registers all)

from pgolf_lit.quant.upstream_read import read_upstream_artifact
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
