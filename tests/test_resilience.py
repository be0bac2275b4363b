"""mesa_seg.hooks / fileio / preflight / models.checkpoint: range faults on a
real model step,
NaN/Inf stop before the optimizer step, checkpoints across Mesa/FP32 variants,
atomic writes, RNG states, and bad input failing before anything is written.

End-to-end training runs (resume, killed save, AMP, NaN through tools/) are in
test_resilience_train.py, the 2-rank run in test_resilience_dist.py.
"""
import os
import os.path as osp
import random
import shutil
import stat
import types

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.fileio import get_file_backend
from mmengine.optim import OptimWrapper
from mmengine.runner.checkpoint import _load_checkpoint_to_model
from mmengine.structures import PixelData
from PIL import Image

import mesa_seg.mesa as mesa
from mesa_seg import register_all_modules
from mesa_seg.cli import run_test, run_train
from mesa_seg.compat import sync_bn_cfg_to_bn
from mesa_seg.errors import (CheckpointMismatchError, LabelError,
                             NonFiniteLossError)
from mesa_seg.fileio import AtomicLocalBackend
from mesa_seg.hooks import (CheckpointCompatHook, LabelRangeHook,
                            get_random_state, set_random_state)
from mesa_seg.hooks import checkpoint_compat_hook
from mesa_seg.mesa import MesaLinear, RunningRange
from mesa_seg.mesa.primitives import group_view
from mesa_seg.models.checkpoint import match_state_dict
from backbone_utils import is_store_once_second_copy

register_all_modules(init_default_scope=False)  # models, hooks, atomic writes

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY = osp.join(REPO, 'tests', 'data', 'tiny_upernet_swin.py')
# the tiny config with Mesa on backbone and heads (as configs/upernet_swin_mesa)
MESA_OPTIONS = [
    'model.type=MesaEncoderDecoder', 'model.mesa.groups=channels',
    'model.backbone.type=MesaSwinTransformer'
]


@pytest.fixture(autouse=True)
def _one_thread_eager():
    """One thread (2-thread OpenMP is ~10x slower on this busy 2-core box)
    and eager Mesa kernels (no 20 s compilation per process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with mesa.use_backend('eager'):
        yield
    torch.set_num_threads(threads)


def _model_cfg(mesa_on: bool, **backbone):
    cfg = Config.fromfile(TINY).model
    if mesa_on:
        cfg.type = 'MesaEncoderDecoder'
        cfg.mesa = dict(groups='channels')
        cfg.backbone.type = 'MesaSwinTransformer'
    cfg.backbone.update(backbone)
    return sync_bn_cfg_to_bn(cfg)


def _build(mesa_on: bool, seed: int = 0, **backbone):
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS
    torch.manual_seed(seed)
    with DefaultScope.overwrite_default_scope('mmseg'):
        return MODELS.build(_model_cfg(mesa_on, **backbone))


def _batch(seed: int, n: int = 2, size: int = 64) -> dict:
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for _ in range(n):
        inputs.append(torch.randint(0, 256, (3, size, size), generator=g,
                                    dtype=torch.uint8))
        sample = SegDataSample(metainfo=dict(
            img_shape=(size, size), ori_shape=(size, size),
            pad_shape=(size, size)))
        sample.gt_sem_seg = PixelData(
            data=torch.randint(0, 150, (1, size, size), generator=g))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def _first_mesa_linear(model):
    return next((n, m) for n, m in model.named_modules()
                if n.startswith('backbone.stages') and isinstance(m, MesaLinear))


def _capture_packs(module):
    """Record (input, Packed) of every pack() of the module's quantizer."""
    records, pack = [], module.quantizer.pack

    def recording_pack(x):
        packed = pack(x)
        records.append((x.detach().clone(), packed))
        return packed

    module.quantizer.pack = recording_pack
    return records


def _replace_input(fn):
    return lambda module, args: (fn(args[0].clone()), *args[1:])


# ---- range faults on a real training step -----------------------------------
def test_activations_far_outside_the_range_saturate_and_estimates_adapt():
    model = _build(True)
    model.train()
    optim = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=6e-5))
    name, layer = _first_mesa_linear(model)
    q = layer.quantizer
    for i in range(2):
        model.train_step(_batch(i), optim)
    r_normal = q.running_range.clone()
    records = _capture_packs(layer)

    hook = layer.register_forward_pre_hook(_replace_input(lambda x: x * 100))
    log_vars = model.train_step(_batch(3), optim)
    hook.remove()
    assert all(torch.isfinite(torch.as_tensor(v)) for v in log_vars.values())
    x, packed = records[-1]
    x3 = group_view(x, q.groups, q.dim)
    bmin, bmax = x3.amin(dim=(0, 2)), x3.amax(dim=(0, 2))
    # the estimate moved by (1 - momentum) towards the x100 batch ...
    torch.testing.assert_close(q.running_range,
                               0.9 * r_normal + 0.1 * (bmax - bmin))
    assert (q.running_range > 5 * r_normal).all()
    # ... and this batch was quantized on it: values beyond it saturate at
    # the ends of the code range (no wrap-around)
    torch.testing.assert_close(packed.rng, q.running_range)
    lo = packed.lo[None, :, None]
    hi = lo + packed.rng[None, :, None]
    assert (x3 > hi).any() and (x3 < lo).any(), 'the fault was not out of range'
    assert (packed.q[x3 > hi] == 255).all() and (packed.q[x3 < lo] == 0).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())

    # training continues on normal batches; the estimate decays back
    ranges = [q.running_range.clone()]
    for i in range(4, 6):
        log_vars = model.train_step(_batch(i), optim)
        assert torch.isfinite(torch.as_tensor(log_vars['loss']))
        ranges.append(q.running_range.clone())
    assert all((b < a).all() for a, b in zip(ranges, ranges[1:])), name


@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_nan_inf_activation_stops_before_the_optimizer_step(bad):
    model = _build(True)
    model.train()
    optim = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=6e-5))
    for i in range(2):
        model.train_step(_batch(i), optim)
    name, layer = _first_mesa_linear(model)
    q = layer.quantizer
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    ranges = {k: m.running_range.clone() for k, m in model.named_modules()
              if isinstance(m, RunningRange)}
    estimates = (q.running_min.clone(), q.running_range.clone())
    adam_steps = [s['step'].clone() for s in optim.optimizer.state.values()]
    records = _capture_packs(layer)

    def poison(x):
        x.view(-1)[7] = bad
        return x

    hook = layer.register_forward_pre_hook(_replace_input(poison))
    with pytest.raises(NonFiniteLossError) as err:
        model.train_step(_batch(2), optim)
    hook.remove()
    msg = str(err.value)
    assert 'non-finite loss' in msg and 'before the optimizer step' in msg
    assert 'decode.loss_ce=nan' in msg
    # observer.py: the statistics of a non-finite batch never enter the
    # estimates (the layer keeps its previous range), and the range returned
    # for this batch is NaN, not a plausible finite one
    _, packed = records[-1]
    assert torch.isnan(packed.rng).all() and torch.isnan(packed.lo).all()
    assert torch.equal(q.running_min, estimates[0])
    assert torch.equal(q.running_range, estimates[1])
    # layers before the fault saw finite data; none took in a NaN/Inf
    assert all(torch.isfinite(m.running_range).all() for m in
               model.modules() if isinstance(m, RunningRange)), ranges.keys()
    # nothing was stepped: parameters and optimizer as before the batch
    for key, value in model.named_parameters():
        assert torch.equal(value, params[key]), key
    assert [s['step'] for s in optim.optimizer.state.values()] == adam_steps
    assert all(p.grad is None or torch.isfinite(p.grad).all()
               for p in model.parameters())


# ---- checkpoints across variants ---------------------------------------------
def _load_as_runner_does(model, state_dict, hook=None):
    """Runner.load_checkpoint: after_load_checkpoint hooks, then mmengine's
    loader (strict=False)."""
    checkpoint = dict(state_dict=dict(state_dict))
    runner = types.SimpleNamespace(model=model)
    (hook or CheckpointCompatHook()).after_load_checkpoint(runner, checkpoint)
    _load_checkpoint_to_model(model, checkpoint, strict=False)


@pytest.fixture
def logs(monkeypatch):
    lines = []
    monkeypatch.setattr(checkpoint_compat_hook, 'print_log',
                        lambda msg, **kw: lines.append(msg))
    return lines


def _quantizer_keys(model):
    return {f'{n}.{b}' for n, m in model.named_modules()
            if isinstance(m, RunningRange) for b in m._buffers}


def test_fp32_checkpoint_loads_into_mesa_model(logs):
    fp32, mesa_model = _build(False, seed=1), _build(True, seed=2)
    extra, absent = match_state_dict(mesa_model, fp32.state_dict())
    assert extra == [] and set(absent) == _quantizer_keys(mesa_model)
    _load_as_runner_does(mesa_model, fp32.state_dict())
    for key, value in fp32.state_dict().items():
        assert torch.equal(mesa_model.state_dict()[key], value), key
    assert len(logs) == 1 and 'initialise from the first training batch' in \
        logs[0]
    ranges = {n: m for n, m in mesa_model.named_modules() if isinstance(m, RunningRange)}
    assert not any(m.initialized.any() for m in ranges.values())
    mesa_model.train()
    optim = OptimWrapper(torch.optim.AdamW(mesa_model.parameters(), lr=1e-5))
    mesa_model.train_step(_batch(0), optim)
    # Store-once: the probabilities are stored by softmax (not again by
    # av_matmul), the MLP hidden by GELU (not again by the output Linear).
    unused = {n for n in ranges if is_store_once_second_copy(n)}
    assert unused and all(not ranges[n].initialized.any() for n in unused)
    assert all(m.initialized.all() for n, m in ranges.items() if n not in unused)


def test_mesa_checkpoint_loads_into_fp32_model_with_one_log_line(logs):
    fp32, mesa_model = _build(False, seed=1), _build(True, seed=2)
    state = mesa_model.state_dict()
    extra, absent = match_state_dict(fp32, state)
    assert set(extra) == _quantizer_keys(mesa_model) and absent == []
    _load_as_runner_does(fp32, state)
    for key, value in fp32.state_dict().items():
        assert torch.equal(state[key], value), key
    assert len(logs) == 1 and f'ignored {len(extra)} quantizer buffers' in \
        logs[0]


def test_any_other_mismatch_is_an_error_listing_the_keys():
    model = _build(True)
    state = dict(model.state_dict())
    del state['decode_head.conv_seg.weight']
    state['decode_head.extra.weight'] = torch.zeros(1)
    state['auxiliary_head.conv_seg.bias'] = torch.zeros(7)
    with pytest.raises(CheckpointMismatchError) as err:
        _load_as_runner_does(model, state)
    msg = str(err.value)
    assert '1 missing keys: decode_head.conv_seg.weight' in msg
    assert '1 unexpected keys: decode_head.extra.weight' in msg
    assert 'auxiliary_head.conv_seg.bias (7,) vs model (150,)' in msg
    # a DDP-saved checkpoint ('module.' prefix) matches as mmengine loads it
    prefixed = {f'module.{k}': v for k, v in model.state_dict().items()}
    assert match_state_dict(model, prefixed)[0] == []
    # opting out restores mmengine's partial load
    _load_as_runner_does(model, state, CheckpointCompatHook(strict=False))


def test_checkpoint_of_another_architecture_is_rejected():
    wide = _build(False, embed_dims=48)
    with pytest.raises(CheckpointMismatchError) as err:
        match_state_dict(_build(True), wide.state_dict())
    assert 'shape mismatches' in str(err.value)
    assert 'backbone.patch_embed.projection.weight (48, 3, 4, 4)' in \
        str(err.value)


# ---- atomic checkpoint writes ------------------------------------------------
def test_local_writes_are_atomic(tmp_path, disk_full_on):
    path = tmp_path / 'iter_2.pth'
    backend = get_file_backend(str(path))
    assert isinstance(backend, AtomicLocalBackend)
    backend.put(b'old checkpoint', str(path))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask

    disk_full_on('iter_2.pth')  # the temporary file's name contains it
    with pytest.raises(OSError):
        backend.put(b'new checkpoint, never completed', str(path))
    assert path.read_bytes() == b'old checkpoint'
    assert os.listdir(tmp_path) == ['iter_2.pth']  # no temporary file left


# ---- RNG states ----------------------------------------------------------------
def test_random_state_round_trips_through_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(dict(random_state=get_random_state()), tmp_path / 'c.pth')
    expected = (random.random(), np.random.rand(3), torch.rand(3))
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    state = torch.load(tmp_path / 'c.pth', weights_only=True)['random_state']
    set_random_state(state)
    assert random.random() == expected[0]
    assert np.array_equal(np.random.rand(3), expected[1])
    assert torch.equal(torch.rand(3), expected[2])


# ---- labels checked per batch ----------------------------------------------------
def test_label_range_hook_names_the_file():
    head = types.SimpleNamespace(num_classes=4, ignore_index=255)
    runner = types.SimpleNamespace(model=types.SimpleNamespace(decode_head=head))
    batch = _batch(0)
    for i, sample in enumerate(batch['data_samples']):
        sample.gt_sem_seg = PixelData(data=torch.tensor([[[0, 3], [255, 1]]]))
        sample.set_metainfo(dict(seg_map_path=f'ann/{i}.png'))
    LabelRangeHook().before_train_iter(runner, 0, batch)
    batch['data_samples'][1].gt_sem_seg = PixelData(
        data=torch.tensor([[[0, 4], [9, 255]]]))
    with pytest.raises(LabelError, match=r'label values \[4, 9\] outside '
                       r'\[0, 4\).*ann/1\.png'):
        LabelRangeHook().before_train_iter(runner, 0, batch)


# ---- bad input: one line, exit 2, nothing written ------------------------------
@pytest.fixture
def data(tmp_path, demo_root):
    """A private copy of the demo set to break."""
    root = tmp_path / 'ade'
    shutil.copytree(demo_root, root)
    return root


def _train_fails(capsys, tmp_path, root, *options, args=()):
    work_dir = tmp_path / 'work'
    loaders = ('train_dataloader', 'val_dataloader', 'test_dataloader')
    argv = [TINY, '--work-dir', work_dir, *args, '--cfg-options',
            *[f'{k}.dataset.data_root={root}' for k in loaders], *options]
    rc = run_train([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and ': error: ' in err[0], err
    # nothing written: no log folder, config dump or checkpoint
    assert not work_dir.exists() or os.listdir(work_dir) == []
    return err[0]


def _train_images(root):
    return sorted((root / 'images' / 'training').iterdir())


def _train_annotations(root):
    return sorted((root / 'annotations' / 'training').iterdir())


def test_corrupt_image(capsys, tmp_path, data):
    image = _train_images(data)[2]
    image.write_bytes(image.read_bytes()[:300])  # truncated JPEG
    err = _train_fails(capsys, tmp_path, data)
    assert f'corrupt image {image}' in err
    image.write_bytes(b'not an image')
    assert f'corrupt image {image}' in _train_fails(capsys, tmp_path, data)


def test_label_values_outside_the_class_range(capsys, tmp_path, data):
    ann = _train_annotations(data)[0]
    labels = np.array(Image.open(ann))
    labels[:3, :3] = 200  # ADE20K: 150 classes, raw 1..150 (0 = ignored)
    Image.fromarray(labels).save(ann)
    err = _train_fails(capsys, tmp_path, data)
    assert f'annotation {ann} has label values [200] outside 0..150' in err
    Image.fromarray(np.stack([labels] * 3, -1)).save(ann)  # an RGB "label"
    assert 'has mode RGB' in _train_fails(capsys, tmp_path, data)


@pytest.mark.parametrize('options, expected', [
    (['model.backbone.mesa.bitz=4'], "unknown option(s) ['bitz']"),
    (['model.backbone.mesa.bits=4'], 'bits=4 is not supported'),
    (['model.backbone.mesa.groups=3'], 'groups=3 does not divide'),
    (['model.backbone.mesa.groups=2'],
     'groups=2 does not divide the 1 attention heads of '
     'stages.0.blocks.0.attn.w_msa'),
])
def test_bad_mesa_options(capsys, tmp_path, demo_root, options, expected):
    err = _train_fails(capsys, tmp_path, demo_root, *MESA_OPTIONS, *options)
    assert 'invalid model config (model.backbone)' in err and expected in err


def test_crop_larger_than_the_pipeline_allows(capsys, tmp_path, demo_root):
    # tiny config: RandomResize(scale=(256, 64), ratio_range=(1.0, 1.5)),
    # so the short side is at most 96 px
    crop = 'train_dataloader.dataset.pipeline.3.crop_size=(128,128)'
    err = _train_fails(capsys, tmp_path, demo_root, crop,
                       'model.data_preprocessor.size=(128,128)')
    assert 'crop_size=(128, 128) (h, w) is larger than any image' in err
    assert 'short side <= 96' in err
    err = _train_fails(capsys, tmp_path, demo_root,
                       'train_dataloader.dataset.pipeline.3.crop_size=(64,80)')
    assert 'larger than model.data_preprocessor.size=(64, 64)' in err


def _mismatched_checkpoint(path):
    """A checkpoint of another architecture (wider Swin)."""
    torch.save(dict(state_dict=_build(False, embed_dims=48).state_dict(),
                    meta=dict(iter=1, epoch=0)), path)
    return path


def test_checkpoint_of_another_architecture_fails_every_entry_point(
        capsys, tmp_path, demo_root):
    ckpt = _mismatched_checkpoint(tmp_path / 'other.pth')
    for err in (_train_fails(capsys, tmp_path, demo_root, args=['--resume',
                                                                ckpt]),
                _train_fails(capsys, tmp_path, demo_root, f'load_from={ckpt}')):
        assert f'{ckpt}: checkpoint does not fit the model' in err
        assert 'backbone.patch_embed.projection.weight (48, 3, 4, 4) vs ' \
            'model (32, 3, 4, 4)' in err
    # auto-resume: the work dir's latest checkpoint
    work_dir = tmp_path / 'auto'
    work_dir.mkdir()
    (work_dir / 'last_checkpoint').write_text(str(ckpt))
    data = [f'{k}.dataset.data_root={demo_root}'
            for k in ('train_dataloader', 'val_dataloader', 'test_dataloader')]
    rc = run_train([TINY, '--work-dir', str(work_dir), '--resume',
                    '--cfg-options', *data])
    assert rc == 2 and 'does not fit' in capsys.readouterr().err
    assert sorted(os.listdir(work_dir)) == ['last_checkpoint']
    rc = run_test([TINY, str(ckpt), '--work-dir', str(tmp_path / 'test'),
                   '--cfg-options', *data])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and 'does not fit the model' in err[0]
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(ckpt.read_bytes()[:1000])
    err = _train_fails(capsys, tmp_path, demo_root, f'load_from={truncated}')
    assert f'cannot read checkpoint {truncated}' in err


def test_fp32_checkpoint_loads_into_mesa_mit_with_shared_modules():
    """MiT's FFN holds its activation under two names (``ffn.activate`` and
    ``ffn.layers.2``): its quantizer buffers appear under both in the
    state_dict, and both may be missing from an fp32 checkpoint."""
    from mmseg.models.backbones import MixVisionTransformer

    from mesa_seg.models.backbones.mit import MesaMixVisionTransformer
    arch = dict(embed_dims=16, num_layers=[1, 1, 1, 1], num_heads=[1, 2, 2, 2])
    fp32, mesa_model = MixVisionTransformer(**arch), MesaMixVisionTransformer(**arch)
    shared = [k for k in mesa_model.state_dict() if '.ffn.layers.2.quantizer.' in k]
    assert shared  # the alias is there
    extra, absent = match_state_dict(mesa_model, fp32.state_dict())
    assert extra == [] and set(shared) <= set(absent)
