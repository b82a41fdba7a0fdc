"""Quantization, compression and the artifact: plain PyTorch, no Lightning.

quantizers.py (the registry: a quantizer by name, ``TensorRule``), rtn.py (per-row intN round to nearest), gptq.py,
hessians.py and calibration.py (GPTQ inputs), prune.py
(selective ±1 pruning), compress.py (byte shuffle + codecs), quantized.py (the quantized state dict),
artifact.py (writing the native and upstream containers), reader.py (reading any artifact back: each container
registers its reader, native_read.py, upstream_read.py, pergroup_read.py, pergroup_v2_read.py), code_size.py (honest
code bytes),
export.py (the whole export). Importing this package registers every container.

The names below load on first use (PEP 562), so importing one submodule does not import the export: the quantizer
registry (``quantizers.QUANTIZER_MODULES``) is complete before ``export.py`` builds ``ExportConfig`` from it.
"""

from pgolf_lit.lazy_exports import lazy_exports

from pgolf_lit.quant import native_read, pergroup_read, pergroup_v2_read, upstream_read  # noqa: F401  (registers all)

_EXPORTS = {
    "CodeSize": "code_size",
    "ExportConfig": "export",
    "ExportReport": "export",
    "TensorRule": "export",
    "build_model_from_artifact": "export",
    "collect_hessians": "hessians",
    "dequantize": "export",
    "export_model": "export",
    "load_artifact": "export",
    "measure_code_size": "code_size",
    "model_from_artifact": "export",
    "quantize_state_dict": "export",
    "read_artifact": "export",
    "read_upstream_artifact": "upstream_read",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, globals(), _EXPORTS)
