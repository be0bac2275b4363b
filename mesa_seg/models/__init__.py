"""mmseg integration: registered Mesa backbones, segmentors, heads and losses.

Importing this package registers them in mmseg's ``MODELS``.
"""
# Before anything below imports mmseg: mmseg 1.2.2 hard-imports mmcv.ops,
# which mmcv-lite lacks (no compiled ops), so without compat's stand-in
# ``import mesa_seg.models`` would fail on its own. apply() is idempotent.
from .. import compat

compat.apply()

from . import backbones  # noqa: E402,F401
from .losses import resize_cross_entropy  # noqa: E402,F401
from .segmentors import MesaEncoderDecoder  # noqa: E402,F401
