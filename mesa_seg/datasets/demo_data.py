"""A small, deterministic, learnable dataset in the exact ADE20K layout.

Each image is a synthetic outdoor scene: sky above a random horizon, grass
ground, optionally a lake and a road in perspective, buildings with window
grids and trees with blotchy canopies, plus unlabelled clutter. Classes differ
in colour, texture and shape statistics, but not trivially: sky and water are
both blue (smooth vs. rippled, above vs. below the horizon), trees and grass
both green (dark blotches vs. light stripes). Per-image colour jitter, sensor
noise and JPEG compression are added.

Layout (``data_root`` = ``out_dir``)::

    images/training/ADE_train_00000001.jpg       annotations/training/*.png
    images/validation/ADE_val_00000001.jpg       annotations/validation/*.png

Annotations follow ADE20K: 0 = other (ignored under ``reduce_zero_label``),
``k`` = ADE20K class ``k`` (1-based), so the standard 150-class configs train
on it unchanged. Image ``i`` of a split depends only on ``(seed, split, i)``:
asking for more images keeps the first ones identical.
"""
import json
import os
import os.path as osp
import shutil
import tempfile
from typing import Callable, Dict, Optional, Tuple

import cv2
import numpy as np

__all__ = [
    'DEMO_CLASSES', 'make_scene', 'write_demo_dataset', 'majority_miou'
]

# ADE20K (1-based, = value in the annotation PNG) ids of the demo classes.
DEMO_CLASSES: Dict[str, int] = {
    'building': 2,
    'sky': 3,
    'tree': 5,
    'road': 7,
    'grass': 10,
    'water': 22,
}
OTHER = 0
META_FILE = 'demo_meta.json'
_SPLITS = (('training', 'train', 0), ('validation', 'val', 1))


def _smooth_noise(rng: np.random.Generator, h: int, w: int,
                  cells: int) -> np.ndarray:
    """Zero-mean, unit-ish smooth noise: a coarse random grid, upsampled."""
    coarse = rng.standard_normal((cells, max(1, cells * w // h)))
    return cv2.resize(coarse.astype(np.float32), (w, h),
                      interpolation=cv2.INTER_CUBIC)


def _paint(img, label, mask, colour, cls):
    img[mask] = colour[mask] if colour.ndim == 3 else colour
    label[mask] = cls


def make_scene(rng: np.random.Generator, height: int,
               width: int) -> Tuple[np.ndarray, np.ndarray]:
    """Draw one scene.

    Args:
        rng (np.random.Generator): Source of all randomness.
        height (int): Image height in pixels.
        width (int): Image width in pixels.

    Returns:
        tuple[np.ndarray, np.ndarray]: ``(image, label)``: a BGR uint8 image
        (H, W, 3) and its uint8 ADE20K annotation (H, W).
    """
    h, w = height, width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)  # RGB while painting
    label = np.full((h, w), OTHER, np.uint8)
    ids = DEMO_CLASSES
    horizon = int(h * rng.uniform(0.3, 0.55))

    # Sky: smooth vertical blue gradient with soft white clouds.
    t = (yy / max(horizon, 1))[..., None]
    top, bottom = np.array([40, 90, 200]), np.array([150, 195, 240])
    sky = top * (1 - t) + bottom * t
    clouds = np.clip(_smooth_noise(rng, h, w, 4) - 0.3, 0, None)[..., None]
    sky = sky + clouds * 60
    _paint(img, label, yy < horizon, sky, ids['sky'])

    # Grass: light yellow-green with fine vertical stripes.
    stripes = np.sin(xx * rng.uniform(0.8, 1.6) +
                     _smooth_noise(rng, h, w, 16) * 3)[..., None]
    grass = np.array([110, 170, 60]) + stripes * 18 + \
        _smooth_noise(rng, h, w, 8)[..., None] * 12
    _paint(img, label, yy >= horizon, grass, ids['grass'])

    # Water: a lake band below the horizon, blue-cyan horizontal ripples.
    if rng.random() < 0.6:
        y0 = horizon + rng.uniform(0.05, 0.3) * (h - horizon)
        y1 = y0 + rng.uniform(0.15, 0.4) * (h - horizon)
        x0, x1 = sorted(rng.uniform(-0.2, 1.2, 2) * w)
        lake = ((yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1 + 0.3 * w))
        ripples = np.sin(yy * rng.uniform(0.5, 0.9) +
                         np.sin(xx * 0.05) * 2)[..., None]
        water = np.array([40, 110, 170]) + ripples * 30
        _paint(img, label, lake, water, ids['water'])

    # Road: a gray trapezoid towards a vanishing point, with dashed lanes.
    if rng.random() < 0.7:
        vx = rng.uniform(0.3, 0.7) * w
        half_bottom = rng.uniform(0.2, 0.4) * w
        depth = (yy - horizon) / max(h - horizon, 1)
        centre = vx + (rng.uniform(0.2, 0.8) * w - vx) * depth
        road = (yy > horizon) & (np.abs(xx - centre) < half_bottom * depth)
        gray = 95 + _smooth_noise(rng, h, w, 24)[..., None] * 8
        lane = (np.abs(xx - centre) < 2 + 6 * depth) & (
            np.sin(np.log1p(np.clip(depth, 0, None) * 40) * 6) > 0.3)
        road_rgb = np.repeat(gray, 3, axis=2)
        road_rgb[lane] = 225
        _paint(img, label, road, road_rgb, ids['road'])

    # Buildings: rectangles on the horizon with a grid of dark windows.
    for _ in range(rng.integers(0, 4)):
        bw = rng.uniform(0.08, 0.25) * w
        bh = rng.uniform(0.15, 0.45) * h
        bx = rng.uniform(-0.05, 0.95) * w
        base = horizon + rng.uniform(0, 0.05) * h
        box = (xx >= bx) & (xx < bx + bw) & (yy >= base - bh) & (yy < base)
        facade = rng.choice([[150, 150, 155], [170, 140, 110],
                             [200, 190, 165], [120, 95, 90]])
        pitch = rng.uniform(10, 22)
        windows = ((xx - bx) % pitch < pitch * 0.5) & \
            ((yy - base) % (pitch * 1.3) < pitch * 0.6)
        colour = np.broadcast_to(np.asarray(facade, np.float32),
                                 (h, w, 3)).copy()
        colour[windows] = [40, 50, 70]
        _paint(img, label, box, colour, ids['building'])

    # Trees: a brown trunk under a cluster of dark, blotchy green blobs.
    blotches = _smooth_noise(rng, h, w, 48)[..., None]
    for _ in range(rng.integers(0, 5)):
        tx = rng.uniform(0, 1) * w
        ty = horizon + rng.uniform(0, 0.6) * (h - horizon)
        size = rng.uniform(0.08, 0.18) * h * (0.5 + (ty - horizon) /
                                               max(h - horizon, 1))
        trunk = (np.abs(xx - tx) < size * 0.12) & (yy < ty) & \
            (yy > ty - size * 1.2)
        _paint(img, label, trunk, np.array([90, 60, 35]), ids['tree'])
        crown = np.zeros((h, w), bool)
        for _ in range(rng.integers(3, 7)):
            cx = tx + rng.normal(0, size * 0.4)
            cy = ty - size * 1.2 - rng.uniform(0, size * 0.8)
            r = size * rng.uniform(0.4, 0.7)
            crown |= (xx - cx)**2 + (yy - cy)**2 < r * r
        leaves = np.array([35, 95, 40]) + blotches * 25
        _paint(img, label, crown, leaves, ids['tree'])

    # Clutter: random-coloured ellipses labelled "other" (ignored).
    for _ in range(rng.integers(1, 4)):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        ax, ay = rng.uniform(0.02, 0.08, 2) * h
        blob = ((xx - cx) / ax)**2 + ((yy - cy) / ay)**2 < 1
        _paint(img, label, blob, rng.uniform(0, 255, 3), OTHER)

    # Camera: global colour jitter plus sensor noise.
    img = img * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20, 3)
    img += rng.normal(0, 6, img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img[..., ::-1]), label


def _split_seed(seed: int, split: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, split, index])


def write_demo_dataset(out_dir: str,
                       num_train: int = 40,
                       num_val: int = 10,
                       size: int = 512,
                       seed: int = 0,
                       progress: Optional[Callable[[], object]] = None
                       ) -> Dict:
    """Write the demo dataset; ``out_dir`` becomes an ADE20K ``data_root``.

    Files go to a temporary folder next to ``out_dir`` that is renamed at the
    end, so an interrupted run never leaves a half-written dataset.

    Args:
        out_dir (str): Destination; must not exist or be empty.
        num_train (int): Training images. Default: 40.
        num_val (int): Validation images. Default: 10.
        size (int): Image height (ADE20K's shorter side); widths vary
            from ``size`` to ``1.5 * size``. Default: 512.
        seed (int): Dataset seed. Default: 0.
        progress (callable, optional): Called without arguments after each
            image and its annotation are written (e.g. a tqdm bar's
            ``update``). Default: None.

    Returns:
        dict: The metadata also written to ``out_dir/demo_meta.json``.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError('num_train and num_val must be >= 1, got '
                         f'{num_train} and {num_val}')
    if size < 32:
        raise ValueError(f'size must be >= 32 pixels, got {size}')
    out_dir = osp.abspath(out_dir)
    if osp.exists(out_dir) and (not osp.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f'{out_dir} already exists and is not empty')
    parent = osp.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix='.demo_data_', dir=parent)
    try:
        counts = {}
        for folder, prefix, split_id in _SPLITS:
            n = num_train if split_id == 0 else num_val
            counts[folder] = n
            img_dir = osp.join(tmp, 'images', folder)
            ann_dir = osp.join(tmp, 'annotations', folder)
            os.makedirs(img_dir)
            os.makedirs(ann_dir)
            for i in range(n):
                rng = _split_seed(seed, split_id, i)
                width = int(size * rng.uniform(1.0, 1.5))
                img, label = make_scene(rng, size, width)
                stem = f'ADE_{prefix}_{i + 1:08d}'
                cv2.imwrite(
                    osp.join(img_dir, stem + '.jpg'), img,
                    [cv2.IMWRITE_JPEG_QUALITY, 90])
                cv2.imwrite(osp.join(ann_dir, stem + '.png'), label)
                if progress is not None:
                    progress()
        meta = dict(
            generator='mesa_seg.datasets.demo_data',
            seed=seed,
            size=size,
            counts=counts,
            classes=DEMO_CLASSES)
        with open(osp.join(tmp, META_FILE), 'w') as f:
            json.dump(meta, f, indent=2)
        if osp.isdir(out_dir):
            os.rmdir(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def majority_miou(data_root: str, split: str = 'validation') -> float:
    """mIoU (%) of predicting the most frequent class everywhere.

    The reference a trained model must clearly beat, computed as mmseg's
    ``IoUMetric`` does on ``reduce_zero_label`` data (other pixels ignored,
    classes neither in the ground truth nor predicted skipped).

    Args:
        data_root (str): An ADE20K-layout folder.
        split (str): 'training' or 'validation'. Default: 'validation'.
    """
    ann_dir = osp.join(data_root, 'annotations', split)
    counts = np.zeros(256, np.int64)
    for name in sorted(os.listdir(ann_dir)):
        label = cv2.imread(osp.join(ann_dir, name), cv2.IMREAD_UNCHANGED)
        counts += np.bincount(label.ravel(), minlength=256)
    counts[OTHER] = 0
    if not counts.any():
        raise ValueError(f'no labelled pixels in {ann_dir}')
    return 100.0 * counts.max() / counts.sum() / np.count_nonzero(counts)
