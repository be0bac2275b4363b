"""mmseg integration: registered Mesa backbones, segmentors, heads and losses."""
from . import backbones  # noqa: F401
