"""mmcv's layer wrappers -> the torch classes they wrap, in place.

mmcv's ``Conv2d``, ``Linear``, ``ConvTranspose2d``, ``MaxPool2d``... subclass
the torch layer and override ``forward`` only for empty inputs on torch < 1.5
(``mmcv.cnn.bricks.wrappers``); on the torch this package pins they call the
torch forward. Mesa converts exact torch types only (a subclass may override
``forward`` in ways it cannot see), so backbones built from mmcv bricks (MiT's
``MixFFN`` and spatial reduction, ViT's ``FFN``) would keep these layers in full
precision. :func:`mmcv_to_torch_layers_` gives each such layer its torch class
back: same object, parameters, buffers, hooks and ``state_dict`` keys.
"""
from typing import Mapping

from torch import nn

__all__ = ['mmcv_to_torch_layers_', 'swap_classes_']


def _mmcv_wrappers() -> dict:
    from mmcv.cnn.bricks import wrappers
    pairs = {}
    for name, torch_cls in (('Conv2d', nn.Conv2d), ('Conv3d', nn.Conv3d),
                            ('ConvTranspose2d', nn.ConvTranspose2d),
                            ('ConvTranspose3d', nn.ConvTranspose3d),
                            ('MaxPool2d', nn.MaxPool2d), ('MaxPool3d', nn.MaxPool3d),
                            ('Linear', nn.Linear)):
        wrapper = getattr(wrappers, name, None)
        if wrapper is not None and wrapper.__bases__ == (torch_cls, ):
            pairs[wrapper] = torch_cls
    return pairs


def swap_classes_(model: nn.Module, classes: Mapping[type, type]) -> int:
    """Give every module of ``model`` whose exact class is a key of ``classes``
    the class it maps to, in place (same attributes, so the same ``state_dict``).
    Returns how many modules changed class."""
    changed = 0
    for module in model.modules():
        new_cls = classes.get(type(module))
        if new_cls is not None:
            module.__class__ = new_cls
            changed += 1
    return changed


def mmcv_to_torch_layers_(model: nn.Module) -> int:
    """Swap the class of every mmcv wrapper layer in ``model`` for the torch
    class it subclasses. Returns how many layers were changed."""
    return swap_classes_(model, _mmcv_wrappers())
