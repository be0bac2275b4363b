"""mesa-seg: Mesa (8-bit activation) memory-saving training for mmsegmentation.

Importing this package loads nothing but this file: the core
(:mod:`mesa_seg.mesa`) depends on torch only, and nothing touches mmseg,
mmengine or mmcv until :func:`register_all_modules` runs. That function applies
the compat fixes (before mmseg's models are imported), makes checkpoint writes
atomic and registers the Mesa models and hooks in mmseg's/mmengine's
registries; configs run it through
``custom_imports=dict(imports=['mesa_seg.register'])``.
"""

__version__ = '0.1.0'

__all__ = ['register_all_modules']


def register_all_modules(init_default_scope: bool = True) -> None:
    """See :func:`mesa_seg.setup_env.register_all_modules` (imported only
    when called, so ``import mesa_seg`` stays free of mmseg/mmengine)."""
    from .setup_env import register_all_modules as _register
    _register(init_default_scope)
