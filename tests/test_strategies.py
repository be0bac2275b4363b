"""mesa_seg.strategies: what each strategy builds, that it trains, that
strategies are absolute, and the errors."""
import argparse
import copy
import math
import os.path as osp

import pytest
import torch
from mmengine.config import Config

from mesa_seg.errors import UsageError
from mesa_utils import eager_by_default  # noqa: F401  (fixture: eager Mesa kernels)
from mesa_seg.strategies import (LOSS_FUSED, LOSS_MMSEG, STRATEGIES, add_strategy_argument,
                                 apply_strategy, describe, get_strategy, strategy_table)

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY = osp.join(REPO, 'tests', 'data', 'tiny_upernet_swin.py')
CUDA = torch.cuda.is_available()
# prepare_cfg turns fp16 AMP into bf16 on CPU
AMP_WRAPPER = 'AmpOptimWrapper' if CUDA else 'CPUAmpOptimWrapper'

# strategy: (segmentor, backbone class name (module), with_cp of every block,
#            fused-loss heads, Mesa layers, optimizer wrapper)
EXPECTED = {
    'fp32': ('EncoderDecoder', 'mmseg.SwinTransformer', False, False, False, 'OptimWrapper'),
    'fused_loss': ('MesaEncoderDecoder', 'mmseg.SwinTransformer', False, True, False,
                   'OptimWrapper'),
    'amp': ('EncoderDecoder', 'mmseg.SwinTransformer', False, False, False, AMP_WRAPPER),
    'cp': ('EncoderDecoder', 'mmseg.SwinTransformer', True, False, False, 'OptimWrapper'),
    'sac': ('EncoderDecoder', 'mesa_seg.MesaSwinTransformer', 'selective', False, False,
            'OptimWrapper'),
    'mesa': ('MesaEncoderDecoder', 'mesa_seg.MesaSwinTransformer', False, True, True,
             'OptimWrapper'),
    'mesa_amp': ('MesaEncoderDecoder', 'mesa_seg.MesaSwinTransformer', False, True, True,
                 AMP_WRAPPER),
    'mesa_cp': ('MesaEncoderDecoder', 'mesa_seg.MesaSwinTransformer', True, True, True,
                'OptimWrapper'),
}


def test_the_eight_strategies_in_report_order():
    assert list(STRATEGIES) == ['fp32', 'fused_loss', 'amp', 'cp', 'sac', 'mesa',
                                'mesa_amp', 'mesa_cp']
    assert set(EXPECTED) == set(STRATEGIES)


def _backbone_class(name):
    from mmseg.models.backbones import SwinTransformer

    from mesa_seg.models.backbones import MesaSwinTransformer
    return {'mmseg.SwinTransformer': SwinTransformer,
            'mesa_seg.MesaSwinTransformer': MesaSwinTransformer}[name]


@pytest.mark.parametrize('name', list(EXPECTED))
def test_strategy_builds_and_trains_one_step(name):
    from mesa_seg.memory.measure import RunSpec, build_training, load_cfg, synthetic_batch
    from mesa_seg.mesa import mesa_modules
    from mesa_seg.models.losses import FusedLossHeadMixin
    segmentor, backbone, with_cp, fused, mesa, wrapper = EXPECTED[name]
    device = 'cuda' if CUDA else 'cpu'
    cfg, size = load_cfg(RunSpec(config=TINY, size=(64, 64), strategy=name, device=device))
    torch.manual_seed(0)
    model, optim_wrapper = build_training(cfg, device)

    assert type(model).__name__ == segmentor
    assert type(model.backbone) is _backbone_class(backbone)
    assert {block.with_cp for stage in model.backbone.stages
            for block in stage.blocks} == {with_cp}
    heads = [model.decode_head, model.auxiliary_head]
    assert [isinstance(h, FusedLossHeadMixin) for h in heads] == [fused, fused]
    assert (len(mesa_modules(model)) > 0) is mesa
    assert type(optim_wrapper).__name__ == wrapper
    if wrapper == 'CPUAmpOptimWrapper':
        assert optim_wrapper.cast_dtype == torch.bfloat16
    if wrapper == 'AmpOptimWrapper':
        assert optim_wrapper.loss_scaler is not None  # dynamic loss scale

    outputs = []
    forward = model.decode_head.forward
    model.decode_head.forward = lambda *a, **k: outputs.append(forward(*a, **k)) or \
        outputs[-1]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    log_vars = model.train_step(synthetic_batch(model, 2, size), optim_wrapper)
    del model.decode_head.forward
    assert math.isfinite(float(log_vars['loss']))
    expected_dtype = (torch.float16 if CUDA else torch.bfloat16) if 'amp' in name \
        else torch.float32
    assert outputs[0].dtype == expected_dtype
    changed = sum(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters())
    assert changed > 0.9 * len(before)  # the optimizer stepped


def _model(path):
    from mesa_seg.runner import load_config
    return load_config(osp.join(REPO, path))


@pytest.mark.parametrize('mesa_config,baseline', [
    ('configs/upernet_swin_mesa.py', 'configs/upernet_swin.py'),
    ('configs/fpn_pvt_mesa.py', 'configs/fpn_pvt.py'),
    ('configs/fpn_pvtv2_b0_mesa.py', 'configs/fpn_pvtv2_b0.py'),
    ('configs/upernet_swin_mesa_amp.py', 'configs/upernet_swin.py'),
    ('configs/segformer_mit_b0_mesa.py', 'configs/segformer_mit_b0.py'),
    ('configs/upernet_deit_s_mesa.py', 'configs/upernet_deit_s.py'),
    ('configs/segformer_mit_b0_mesa_fused_attn.py', 'configs/segformer_mit_b0.py'),
    ('configs/upernet_deit_s_mesa_fused_attn.py', 'configs/upernet_deit_s.py'),
])
def test_strategies_are_absolute(mesa_config, baseline):
    """fp32 on a Mesa config is the baseline config; mesa on the baseline is the
    Mesa config (model and optimizer wrapper alike)."""
    fp32 = apply_strategy(_model(mesa_config), 'fp32')
    base = _model(baseline)
    assert fp32.model.to_dict() == base.model.to_dict()
    assert fp32.optim_wrapper.to_dict() == base.optim_wrapper.to_dict()
    if not mesa_config.endswith(('_amp.py', '_fused_attn.py')):
        mesa = apply_strategy(_model(baseline), 'mesa')
        assert mesa.model.to_dict() == _model(mesa_config).model.to_dict()


def test_amp_strategy_is_the_amp_config():
    amp = apply_strategy(_model('configs/upernet_swin.py'), 'amp')
    assert amp.optim_wrapper.to_dict() == _model('configs/upernet_swin_amp.py') \
        .optim_wrapper.to_dict()
    mesa_amp = apply_strategy(_model('configs/upernet_swin.py'), 'mesa_amp')
    reference = _model('configs/upernet_swin_mesa_amp.py')
    assert mesa_amp.model.to_dict() == reference.model.to_dict()
    assert mesa_amp.optim_wrapper.to_dict() == reference.optim_wrapper.to_dict()


def _custom():
    """A config with every knob set the 'wrong' way."""
    optimizer = dict(type='SGD', lr=0.1)
    return Config(dict(
        model=dict(type='mmseg.MesaEncoderDecoder', mesa=dict(groups=4), fused_loss=False,
                   backbone=dict(type='mmseg.MesaSwinTransformer',
                                 mesa=dict(stochastic_rounding=False, enabled=False),
                                 with_cp=True, depths=[1, 1])),
        optim_wrapper=dict(type='AmpOptimWrapper', loss_scale=512.0, dtype='bfloat16',
                           optimizer=optimizer)))


def test_every_knob_is_set_whatever_the_config_had():
    sgd = dict(type='SGD', lr=0.1)
    cfg = apply_strategy(_custom(), 'fp32')
    assert cfg.model.to_dict() == dict(type='mmseg.EncoderDecoder', backbone=dict(
        type='mmseg.SwinTransformer', depths=[1, 1]))
    assert cfg.optim_wrapper.to_dict() == dict(type='OptimWrapper', optimizer=sgd)

    cfg = apply_strategy(_custom(), 'mesa')  # the policy dicts are kept, Mesa on
    assert cfg.model.to_dict() == dict(
        type='mmseg.MesaEncoderDecoder', mesa=dict(groups=4),
        backbone=dict(type='mmseg.MesaSwinTransformer',
                      mesa=dict(stochastic_rounding=False), depths=[1, 1]))

    cfg = apply_strategy(_custom(), 'fused_loss')
    assert cfg.model.to_dict() == dict(type='mmseg.MesaEncoderDecoder', mesa=None,
                                       backbone=dict(type='mmseg.SwinTransformer',
                                                     depths=[1, 1]))

    cfg = apply_strategy(_custom(), 'sac')
    assert cfg.model.to_dict() == dict(
        type='mmseg.EncoderDecoder',
        backbone=dict(type='mmseg.MesaSwinTransformer', mesa=None, with_cp='selective',
                      depths=[1, 1]))

    cfg = apply_strategy(_custom(), 'mesa_amp')
    assert cfg.optim_wrapper.to_dict() == dict(type='AmpOptimWrapper', loss_scale='dynamic',
                                               optimizer=sgd)
    cfg = apply_strategy(_custom(), 'mesa_cp')
    assert cfg.model.backbone.with_cp is True and cfg.model.mesa == dict(groups=4)

    pvt = Config(dict(model=dict(type='EncoderDecoder', backbone=dict(type='PVTv2')),
                      optim_wrapper=dict(type='OptimWrapper', optimizer=sgd)))
    assert apply_strategy(copy.deepcopy(pvt), 'sac').model.backbone.to_dict() == dict(
        type='PVTv2', with_cp='selective')
    assert apply_strategy(copy.deepcopy(pvt), 'mesa_cp').model.backbone.to_dict() == dict(
        type='MesaPVTv2', mesa=dict(), with_cp=True)
    for base, twin in (('MixVisionTransformer', 'MesaMixVisionTransformer'),
                       ('VisionTransformer', 'MesaVisionTransformer')):
        cfg = Config(dict(model=dict(backbone=dict(type=base)), optim_wrapper=dict(
            type='OptimWrapper', optimizer=sgd)))
        assert apply_strategy(copy.deepcopy(cfg), 'sac').model.backbone.to_dict() == dict(
            type=twin, mesa=None, with_cp='selective')
        assert apply_strategy(copy.deepcopy(cfg), 'mesa').model.backbone.to_dict() == dict(
            type=twin, mesa=dict())
        assert apply_strategy(copy.deepcopy(cfg), 'cp').model.backbone.to_dict() == dict(
            type=base, with_cp=True)
        # torch's fused attention is a Mesa option: kept by Mesa strategies only
        fused = Config(dict(model=dict(backbone=dict(type=twin, fused_attention=True)),
                            optim_wrapper=dict(type='OptimWrapper', optimizer=sgd)))
        for name, kept in (('mesa', True), ('mesa_cp', True), ('fp32', False),
                           ('sac', False), ('cp', False), ('fused_loss', False)):
            backbone = apply_strategy(copy.deepcopy(fused), name).model.backbone
            assert ('fused_attention' in backbone) is kept, name


def _resnet():
    return Config(dict(model=dict(type='EncoderDecoder', backbone=dict(type='ResNetV1c')),
                       optim_wrapper=dict(type='OptimWrapper',
                                          optimizer=dict(type='SGD', lr=0.1))))


def test_errors_name_the_valid_choices():
    with pytest.raises(UsageError, match="unknown strategy 'mesa8'; choose from: fp32, "
                       'fused_loss, amp, cp, sac, mesa, mesa_amp, mesa_cp'):
        apply_strategy(_resnet(), 'mesa8')
    with pytest.raises(UsageError, match='unknown strategy'):
        get_strategy(None)
    for name in ('mesa', 'mesa_amp', 'mesa_cp', 'sac'):
        with pytest.raises(UsageError, match=r'needs a backbone with a Mesa twin '
                           r'\(SwinTransformer/MesaSwinTransformer, PVT/MesaPVT, '
                           r'PVTv2/MesaPVTv2, MixVisionTransformer/MesaMixVisionTransformer, '
                           r'VisionTransformer/MesaVisionTransformer\); this config has '
                           r'ResNetV1c'):
            apply_strategy(_resnet(), name)
    # the others apply to any backbone
    assert apply_strategy(_resnet(), 'cp').model.backbone.to_dict() == dict(
        type='ResNetV1c', with_cp=True)
    assert apply_strategy(_resnet(), 'fused_loss').model.type == 'MesaEncoderDecoder'
    other = Config(dict(model=dict(type='CascadeEncoderDecoder',
                                   backbone=dict(type='SwinTransformer'))))
    with pytest.raises(UsageError, match='this config has CascadeEncoderDecoder'):
        apply_strategy(other, 'mesa')
    with pytest.raises(UsageError, match='needs an optim_wrapper'):
        apply_strategy(Config(dict(model=dict(backbone=dict(type='PVT')))), 'amp')


def test_describe_and_table():
    assert describe('mesa_cp') == dict(
        description='mesa + activation checkpointing of every backbone block',
        loss='fused resize + CE, logits kept in 8 bits (Mesa)',
        activations='Mesa 8-bit (backbone, neck, heads, loss logits)',
        checkpointing='every backbone block', precision='fp32')
    assert describe('amp')['loss'] == LOSS_MMSEG == "mmseg's CE (upsample, then CE)"
    assert describe('fused_loss')['loss'] == LOSS_FUSED == 'fused resize + CE'
    assert describe('sac')['checkpointing'] == 'selective, backbone blocks'
    assert describe('mesa_amp')['precision'] == 'AMP (fp16 on CUDA, bf16 on CPU)'
    table = strategy_table()
    assert len(table) == 2 + 8 and table[2].startswith('| `fp32` | ')
    assert strategy_table(['cp'])[2].startswith("| `cp` | mmseg's CE")


def test_strategy_argument():
    p = argparse.ArgumentParser()
    add_strategy_argument(p)
    add_strategy_argument(p, '--baseline-strategy', what='the baseline')
    args = p.parse_args(['--strategy', 'mesa_cp'])
    assert (args.strategy, args.baseline_strategy) == ('mesa_cp', None)
    assert p.parse_args([]).strategy is None
    with pytest.raises(SystemExit):
        p.parse_args(['--strategy', 'int8'])
    help_text = p.format_help()
    for name in STRATEGIES:
        assert f'{name}:' in help_text
