"""Dataset helpers: the embedded demo dataset in ADE20K layout."""
from .demo_data import (DEMO_CLASSES, majority_miou, make_scene,
                        write_demo_dataset)

__all__ = [
    'DEMO_CLASSES', 'make_scene', 'write_demo_dataset', 'majority_miou'
]
