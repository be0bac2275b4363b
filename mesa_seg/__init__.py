"""mesa-seg: Mesa (8-bit activation) memory-saving training for mmsegmentation.

Importing this package applies the compat fixes (before mmseg is imported) and
registers the Mesa backbones, heads and hooks in mmseg's/mmengine's registries, so
``custom_imports=dict(imports=['mesa_seg'])`` in a config is all a user needs.
The core (``mesa_seg.mesa``) depends on torch only.
"""
from . import compat

compat.apply()

from . import mesa  # noqa: E402
from . import models  # noqa: E402,F401
from . import hooks  # noqa: E402,F401
from . import resilience  # noqa: E402,F401

__version__ = '0.1.0'
