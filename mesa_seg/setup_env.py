"""Registration of mesa-seg in mmseg's/mmengine's registries (as
``mmseg/utils/set_env.py``): :func:`register_all_modules`.

Kept out of ``import mesa_seg`` so that the core (``mesa_seg.mesa``) imports
with torch alone. Configs reach it through ``custom_imports=dict(imports=
['mesa_seg.register'])``; ``tools/train.py`` and ``tools/test.py`` call it.
"""
from mmengine.registry import init_default_scope as _init_default_scope

__all__ = ['register_all_modules']


def register_all_modules(init_default_scope: bool = True) -> None:
    """Make mesa-seg usable from configs (idempotent).

    In this order: applies the compatibility fixes
    (:func:`mesa_seg.compat.apply`; must precede the first import of mmseg's
    models), makes checkpoint writes atomic
    (:func:`mesa_seg.fileio.install_atomic_writes`), makes a data file that
    fails to load during a run name itself
    (:func:`mesa_seg.data_faults.install`), and imports
    :mod:`mesa_seg.models` and :mod:`mesa_seg.hooks`, which registers the Mesa
    backbones, segmentor and heads in mmseg's ``MODELS`` and the hooks in
    mmengine's ``HOOKS``.

    Args:
        init_default_scope (bool): Whether to set the default scope to
            ``'mmseg'`` as mmseg's ``register_all_modules`` does, so
            registries look up mmseg's modules first. A Runner sets it from
            the config's ``default_scope`` anyway. Default: True.
    """
    from . import compat
    compat.apply()
    from . import fileio
    fileio.install_atomic_writes()
    from . import data_faults
    data_faults.install()
    from . import hooks, models  # noqa: F401  (registers them)
    if init_default_scope:
        _init_default_scope('mmseg')
