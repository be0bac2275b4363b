"""The module configs name in ``custom_imports``; importing it runs
:func:`mesa_seg.register_all_modules` (``init_default_scope=False``: the
config's ``default_scope`` sets the scope). That is its only purpose:

    custom_imports = dict(imports=['mesa_seg.register'],
                          allow_failed_imports=False)

makes a config work with mmseg's own ``tools/train.py`` as well as ours.
"""
from .setup_env import register_all_modules

register_all_modules(init_default_scope=False)
