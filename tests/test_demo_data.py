"""The embedded demo dataset: ADE20K layout, determinism, labels, learnability."""
import filecmp
import importlib.util
import json
import os
import os.path as osp

import cv2
import numpy as np
import pytest

from mesa_seg.datasets import DEMO_CLASSES, make_scene, write_demo_dataset
from mesa_seg.datasets.demo_data import OTHER

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


def _files(root, sub):
    return sorted(os.listdir(osp.join(root, sub)))


def test_ade20k_layout_and_names(demo_root):
    assert _files(demo_root, 'images/training') == [
        f'ADE_train_{i:08d}.jpg' for i in range(1, 5)
    ]
    assert _files(demo_root, 'images/validation') == [
        'ADE_val_00000001.jpg', 'ADE_val_00000002.jpg'
    ]
    for split in ('training', 'validation'):
        imgs = _files(demo_root, f'images/{split}')
        anns = _files(demo_root, f'annotations/{split}')
        assert [osp.splitext(f)[0] for f in imgs] == \
            [osp.splitext(f)[0] for f in anns]
        for img_name, ann_name in zip(imgs, anns):
            img = cv2.imread(osp.join(demo_root, 'images', split, img_name))
            ann = cv2.imread(
                osp.join(demo_root, 'annotations', split, ann_name),
                cv2.IMREAD_UNCHANGED)
            assert img.shape[2] == 3 and ann.dtype == np.uint8
            assert ann.ndim == 2 and ann.shape == img.shape[:2]
            assert img.shape[0] == 96 and 96 <= img.shape[1] <= 144
    meta = json.load(open(osp.join(demo_root, 'demo_meta.json')))
    assert meta['counts'] == dict(training=4, validation=2)


def test_labels_are_ade20k_ids_and_all_classes_occur():
    seen = set()
    for i in range(12):
        _, label = make_scene(np.random.default_rng([0, 0, i]), 128, 160)
        values = set(np.unique(label).tolist())
        assert values <= {OTHER, *DEMO_CLASSES.values()}
        seen |= values
    assert seen == {OTHER, *DEMO_CLASSES.values()}


def test_mmseg_ade20k_dataset_reads_it(demo_root):
    from mesa_seg.setup_env import register_all_modules
    register_all_modules()  # compat fixes first: mmcv-lite has no mmcv._ext
    from mmseg.datasets import ADE20KDataset
    from mmseg.utils import register_all_modules as register_mmseg
    register_mmseg()
    ds = ADE20KDataset(
        data_root=demo_root,
        data_prefix=dict(
            img_path='images/training', seg_map_path='annotations/training'),
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations', reduce_zero_label=True),
            dict(type='PackSegInputs')
        ])
    assert len(ds) == 4
    gt = ds[0]['data_samples'].gt_sem_seg.data
    # reduce_zero_label: other -> 255 (ignored), ADE id k -> class k - 1
    assert set(gt.unique().tolist()) <= {
        255, *(k - 1 for k in DEMO_CLASSES.values())
    }
    names = ds.metainfo['classes']
    for name, k in DEMO_CLASSES.items():
        assert names[k - 1].strip() == name


def test_deterministic_and_prefix_stable(tmp_path):
    a, b, c = (str(tmp_path / n) for n in 'abc')
    write_demo_dataset(a, num_train=2, num_val=1, size=64, seed=3)
    write_demo_dataset(b, num_train=2, num_val=1, size=64, seed=3)
    write_demo_dataset(c, num_train=3, num_val=1, size=64, seed=4)
    for sub in ('images/training', 'annotations/training',
                'annotations/validation'):
        names = _files(a, sub)
        match, mismatch, errors = filecmp.cmpfiles(
            osp.join(a, sub), osp.join(b, sub), names, shallow=False)
        assert match == names and not mismatch and not errors
    ann = 'annotations/training/ADE_train_00000001.png'
    assert not filecmp.cmp(osp.join(a, ann), osp.join(c, ann), shallow=False)
    # more images keep the first ones: image i depends on (seed, split, i)
    d = str(tmp_path / 'd')
    write_demo_dataset(d, num_train=3, num_val=1, size=64, seed=3)
    assert filecmp.cmp(osp.join(a, ann), osp.join(d, ann), shallow=False)


def test_progress_is_called_once_per_image(tmp_path):
    calls = []
    meta = write_demo_dataset(
        str(tmp_path / 'p'), 2, 1, 48, progress=lambda: calls.append(1))
    assert len(calls) == 3 == sum(meta['counts'].values())


def test_refuses_non_empty_dir_and_bad_sizes(tmp_path):
    (tmp_path / 'x').mkdir()
    (tmp_path / 'x' / 'keep.txt').write_text('user data')
    with pytest.raises(FileExistsError):
        write_demo_dataset(str(tmp_path / 'x'), 1, 1, 64)
    assert os.listdir(tmp_path / 'x') == ['keep.txt']
    with pytest.raises(ValueError):
        write_demo_dataset(str(tmp_path / 'y'), 0, 1, 64)
    assert not (tmp_path / 'y').exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith('.demo')]


def _pixel_features(img_bgr):
    img = img_bgr.astype(np.float32)
    local_mean = cv2.blur(img, (7, 7))
    texture = cv2.blur((img - local_mean)**2, (7, 7)).mean(2, keepdims=True)
    return np.concatenate([local_mean, np.sqrt(texture)], 2).reshape(-1, 4)


def test_classes_are_separable_but_not_by_colour_alone():
    """A nearest-centroid pixel classifier on colour + local texture beats
    the majority class by a wide margin (learnable), yet stays far from
    perfect (context matters)."""
    def data(split):
        feats, labels = [], []
        for i in range(6):
            img, lab = make_scene(np.random.default_rng([1, split, i]), 96,
                                  128)
            feats.append(_pixel_features(img))
            labels.append(lab.reshape(-1))
        feats, labels = np.concatenate(feats), np.concatenate(labels)
        keep = labels != OTHER
        return feats[keep], labels[keep]

    x, y = data(0)
    classes = sorted(set(y.tolist()))
    centroids = np.stack([x[y == k].mean(0) for k in classes])
    scale = x.std(0)
    xv, yv = data(1)
    dist = (((xv[:, None] - centroids[None]) / scale)**2).sum(-1)
    acc = (np.array(classes)[dist.argmin(1)] == yv).mean()
    majority = np.bincount(yv).max() / len(yv)
    assert acc > majority + 0.2
    assert acc < 0.97


def test_make_demo_data_tool(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        'make_demo_data', osp.join(REPO, 'tools', 'make_demo_data.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / 'tool'
    argv = [str(out), '--num-train', '1', '--num-val', '1', '--size', '48']
    assert tool.main(argv) == 0
    assert 'wrote 1 training + 1 validation images' in capsys.readouterr().out
    assert _files(str(out), 'images/validation') == ['ADE_val_00000001.jpg']
    assert tool.main(argv) == 2
    assert 'already exists' in capsys.readouterr().err
