"""NF4 rounding chosen for each layer's output (GPTQ on the NF4 grid, least-squares block scales),
stored as standard bitsandbytes Linear4bit weights; and the norm weights tuned end to end after it
(`normtune`, measured by bench/norm_tuning.py, not in the app's snapshot)."""

from .calibrate import Rounded, calibrate
from .nf4grid import (
    BLOCK, NF4_CODE, NF4_MIDPOINTS, GptqConfig, GptqFactor, block_absmax, dequantize, double_quantize, gptq_factor,
    gptq_nf4, refit_scales, toward_full_output,
)
from .normtune import NormTuning, final_hidden, fisher_metric, norm_modules, tune_norms
from .pack import install, quant_state
from .snapshot import ROUNDING_FORMAT, build_calibrated, calibration_ids, calibration_texts, snapshot_name

__all__ = [
    "BLOCK", "NF4_CODE", "NF4_MIDPOINTS", "ROUNDING_FORMAT", "GptqConfig", "GptqFactor", "NormTuning", "Rounded",
    "block_absmax", "build_calibrated", "calibrate", "calibration_ids", "calibration_texts", "dequantize",
    "double_quantize", "final_hidden", "fisher_metric", "gptq_factor", "gptq_nf4", "install", "norm_modules",
    "quant_state", "refit_scales", "snapshot_name", "toward_full_output", "tune_norms",
]
