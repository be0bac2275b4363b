"""Registered Mesa backbones (each file adds its import line here)."""
from .pvt import PVT, MesaPVT  # noqa: F401
from .pvt_v2 import PVTv2, MesaPVTv2  # noqa: F401
from .swin import MesaSwinTransformer  # noqa: F401
from .mit import MesaMixVisionTransformer  # noqa: F401
from .vit import MesaVisionTransformer  # noqa: F401
