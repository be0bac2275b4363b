"""mmseg integration: registered Mesa backbones, segmentors, heads and losses."""
from . import backbones  # noqa: F401
from .losses import resize_cross_entropy  # noqa: F401
from .segmentors import MesaEncoderDecoder  # noqa: F401
