"""The Mesa core (torch only): 8-bit activation storage for backward.

Layers, from the bottom up: ``primitives`` (stateless quantize/dequantize),
``config`` (:class:`QuantizerConfig`, the options of a layer's quantizers),
``observer`` (running-range buffers), ``quantizer`` (one layer's activation
quantizer), ``ops`` (autograd Functions), ``modules`` (drop-in nn subclasses),
``sync_batchnorm`` (``MesaSyncBatchNorm``: torch's SyncBatchNorm, 8-bit storage),
``attention`` (``MesaMultiheadAttention``: torch's multi-head attention, exact
forward, 8-bit storage, fused attention without an N x M tensor),
``policy`` (``mesafy_``: convert a model), ``audit`` (what autograd still keeps
in full precision).
"""
from .attention import MesaMultiheadAttention
from .audit import SavedTensorRecord, audit_saved_tensors, format_audit
from .config import QuantizerConfig
from .modules import (MatMul, MesaBatchNorm2d, MesaConv2d, MesaGELU, MesaLayerNorm,
                      MesaLinear, MesaMatMul, MesaModule, MesaReLU, MesaSoftmax)
from .observer import RunningRange
from .policy import (LAYER_TYPES, QUANTIZER_ATTRS, MesaPolicy, mesa_modules, mesafy_,
                     set_mesa_enabled)
from .primitives import (compile_failed, get_backend, reset_compiled_kernels, set_backend,
                         use_backend)
from .quantizer import ActivationQuantizer, Packed
from .sync_batchnorm import MesaSyncBatchNorm

__all__ = [
    'MatMul', 'MesaModule', 'MesaLinear', 'MesaConv2d', 'MesaLayerNorm', 'MesaGELU',
    'MesaSoftmax', 'MesaMatMul', 'MesaBatchNorm2d', 'MesaReLU', 'MesaMultiheadAttention',
    'MesaSyncBatchNorm',
    'QuantizerConfig',
    'RunningRange', 'ActivationQuantizer', 'Packed', 'MesaPolicy', 'LAYER_TYPES',
    'QUANTIZER_ATTRS', 'mesafy_', 'set_mesa_enabled', 'mesa_modules', 'audit_saved_tensors',
    'format_audit', 'SavedTensorRecord', 'get_backend', 'set_backend', 'use_backend',
    'compile_failed', 'reset_compiled_kernels',
]
