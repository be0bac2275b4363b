"""The Mesa core (torch only): 8-bit activation storage for backward.

Layers, from the bottom up: ``primitives`` (stateless quantize/dequantize),
``observer`` (running-range buffers), ``quantizer`` (one layer's activation
quantizer), ``ops`` (autograd Functions), ``modules`` (drop-in nn subclasses),
``policy`` (``mesafy_``: convert a model), ``audit`` (what autograd still keeps
in full precision).
"""
from .audit import SavedTensorRecord, audit_saved_tensors, format_audit
from .modules import (MatMul, MesaBatchNorm2d, MesaConv2d, MesaGELU, MesaLayerNorm,
                      MesaLinear, MesaMatMul, MesaModule, MesaReLU, MesaSoftmax)
from .observer import RunningRange
from .policy import LAYER_TYPES, MesaPolicy, mesa_modules, mesafy_, set_mesa_enabled
from .primitives import get_backend, set_backend
from .quantizer import ActivationQuantizer, Packed

__all__ = [
    'MatMul', 'MesaModule', 'MesaLinear', 'MesaConv2d', 'MesaLayerNorm', 'MesaGELU',
    'MesaSoftmax', 'MesaMatMul', 'MesaBatchNorm2d', 'MesaReLU', 'RunningRange',
    'ActivationQuantizer', 'Packed', 'MesaPolicy', 'LAYER_TYPES', 'mesafy_',
    'set_mesa_enabled', 'mesa_modules', 'audit_saved_tensors', 'format_audit',
    'SavedTensorRecord', 'get_backend', 'set_backend',
]
