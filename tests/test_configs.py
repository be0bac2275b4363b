"""Every config loads, carries custom_imports and builds its model on CPU;
the baseline is mmseg's published Swin-T recipe; the demo configs only
shrink the schedule."""
import glob
import os.path as osp

import pytest
from mmengine.config import Config

import mesa_seg.register  # noqa: F401  (what the configs' custom_imports runs)
from mesa_seg.compat import sync_bn_cfg_to_bn

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = sorted(
    osp.relpath(p, REPO)
    for p in glob.glob(osp.join(REPO, 'configs', '**', '*.py'), recursive=True)
    if '_base_' not in p)


def _load(rel):
    return Config.fromfile(osp.join(REPO, rel))


#: Every config the README lists, each baseline with its Mesa twin: a config
#: that goes missing fails here (the parametrized tests below are drawn from
#: the files present, so they would just run once less).
EXPECTED = [
    f'configs/{name}{suffix}.py'
    for name in ('upernet_swin', 'upernet_swin_s', 'upernet_swin_b', 'fpn_pvt',
                 'fpn_pvt_s', 'fpn_pvt_m', 'fpn_pvtv2_b0', 'fpn_pvtv2_b1',
                 'fpn_pvtv2_b2', 'segformer_mit_b0', 'segformer_mit_b1',
                 'segformer_mit_b2', 'upernet_deit_s')
    for suffix in ('', '_mesa')
] + ['configs/upernet_swin_amp.py', 'configs/upernet_swin_mesa_amp.py',
     'configs/segformer_mit_b0_mesa_fused_attn.py',
     'configs/upernet_deit_s_mesa_fused_attn.py',
     'configs/demo/upernet_swin_demo.py', 'configs/demo/upernet_swin_mesa_demo.py']


def test_configs_found():
    missing = sorted(set(EXPECTED) - set(CONFIGS))
    assert not missing, f'configs missing: {missing}'


@pytest.mark.parametrize('rel', CONFIGS)
def test_config_builds_model(rel):
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules
    register_all_modules()
    cfg = _load(rel)
    assert cfg.custom_imports == dict(
        imports=['mesa_seg.register'], allow_failed_imports=False)
    assert cfg.default_scope == 'mmseg'
    model_cfg = cfg.model
    model_cfg.pretrained = None
    if 'init_cfg' in model_cfg.get('backbone', {}):
        model_cfg.backbone.init_cfg = None
    model = MODELS.build(sync_bn_cfg_to_bn(model_cfg))
    assert sum(p.numel() for p in model.parameters()) > 1e6


def test_baseline_is_mmseg_swin_tiny_ade20k_recipe():
    cfg = _load('configs/upernet_swin.py')
    m = cfg.model
    assert m.backbone.type == 'SwinTransformer'
    assert (m.backbone.embed_dims, m.backbone.depths, m.backbone.num_heads,
            m.backbone.window_size) == (96, [2, 2, 6, 2], [3, 6, 12, 24], 7)
    assert m.backbone.drop_path_rate == 0.3
    assert m.decode_head.type == 'UPerHead' and m.decode_head.channels == 512
    assert m.decode_head.num_classes == m.auxiliary_head.num_classes == 150
    assert m.auxiliary_head.type == 'FCNHead'
    assert m.decode_head.norm_cfg.type == 'SyncBN'
    assert m.data_preprocessor.size == (512, 512)
    # no download at build time
    assert m.pretrained is None and m.backbone.get('init_cfg') is None
    opt = cfg.optim_wrapper
    assert opt.type == 'OptimWrapper'
    assert opt.optimizer == dict(
        type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01)
    assert opt.paramwise_cfg.custom_keys == {
        k: dict(decay_mult=0.)
        for k in ('absolute_pos_embed', 'relative_position_bias_table',
                  'norm')
    }
    warmup, poly = cfg.param_scheduler
    assert (warmup.type, warmup.start_factor, warmup.end) == ('LinearLR',
                                                              1e-6, 1500)
    assert (poly.type, poly.power, poly.eta_min, poly.begin,
            poly.end) == ('PolyLR', 1.0, 0.0, 1500, 160000)
    assert cfg.train_cfg.max_iters == 160000
    assert cfg.train_dataloader.batch_size == 2
    assert cfg.train_dataloader.dataset.data_root == \
        'data/ade/ADEChallengeData2016'
    crop = [t for t in cfg.train_pipeline if t.type == 'RandomCrop'][0]
    assert crop.crop_size == (512, 512)


def _flatten(node, prefix=''):
    if isinstance(node, dict) and node:  # (an empty dict is a value)
        out = {}
        for k, v in node.items():
            out.update(_flatten(v, f'{prefix}{k}.'))
        return out
    return {prefix[:-1]: repr(node)}


def _delta(child, parent):
    c, p = _flatten(_load(child).to_dict()), _flatten(_load(parent).to_dict())
    return {k: c.get(k) for k in set(c) | set(p) if c.get(k) != p.get(k)}


def test_demo_overrides_only_schedule_data_bn_and_lr():
    delta = _delta('configs/demo/upernet_swin_demo.py',
                   'configs/upernet_swin.py')
    allowed = ('data_root', 'crop_size', 'scale', 'max_iters',
               'warmup_iters', 'train_pipeline', 'test_pipeline',
               'train_dataloader', 'val_dataloader', 'test_dataloader',
               'param_scheduler', 'train_cfg', 'default_hooks', 'randomness',
               'optim_wrapper.optimizer.lr',
               'norm_cfg', 'model.data_preprocessor.size',
               'model.decode_head.norm_cfg', 'model.auxiliary_head.norm_cfg')
    assert delta and all(k.startswith(allowed) for k in delta), sorted(delta)


#: What a Mesa config adds to its full-precision baseline (README, "Mesa in a
#: config"), as flattened keys of the resolved config.
SWIN_MESA_PARTS = {
    'model.type': repr('MesaEncoderDecoder'),
    'model.mesa': repr({}),
    'model.backbone.type': repr('MesaSwinTransformer'),
    'model.backbone.mesa': repr({}),
}


def test_flagship_mesa_config_adds_only_the_mesa_parts():
    assert _delta('configs/upernet_swin_mesa.py',
                  'configs/upernet_swin.py') == SWIN_MESA_PARTS


def test_mesa_demo_is_the_fp32_demo_plus_the_mesa_parts():
    """The demo schedule is written once (upernet_swin_demo.py); the Mesa
    demo adds exactly what upernet_swin_mesa.py adds to upernet_swin.py."""
    assert _delta('configs/demo/upernet_swin_mesa_demo.py',
                  'configs/demo/upernet_swin_demo.py') == SWIN_MESA_PARTS
