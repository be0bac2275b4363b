"""PVT / PVTv2 Semantic FPN configs: recipe, Mesa deltas, models build and train."""
import copy
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

import mesa_seg.register  # noqa: F401  (registers the models, as custom_imports)
from mesa_seg.compat import sync_bn_cfg_to_bn
from mesa_seg.mesa import mesa_modules

CONFIGS = Path(__file__).parents[1] / 'configs'
# baseline config -> (backbone type, arch, FPN in_channels)
BASELINES = {
    'fpn_pvt.py': ('PVT', 'tiny', [64, 128, 320, 512]),
    'fpn_pvt_s.py': ('PVT', 'small', [64, 128, 320, 512]),
    'fpn_pvt_m.py': ('PVT', 'medium', [64, 128, 320, 512]),
    'fpn_pvtv2_b0.py': ('PVTv2', 'b0', [32, 64, 160, 256]),
    'fpn_pvtv2_b1.py': ('PVTv2', 'b1', [64, 128, 320, 512]),
    'fpn_pvtv2_b2.py': ('PVTv2', 'b2', [64, 128, 320, 512]),
}


def _load(name):
    return Config.fromfile(str(CONFIGS / name))


def _strip_mesa(model_cfg):
    """A Mesa model config with its Mesa parts undone."""
    model_cfg = copy.deepcopy(model_cfg)
    assert model_cfg.pop('type') == 'MesaEncoderDecoder'
    model_cfg.pop('mesa')
    backbone = model_cfg['backbone']
    assert backbone['type'].startswith('Mesa')
    backbone['type'] = backbone['type'][len('Mesa'):]
    backbone.pop('mesa')
    return dict(type='EncoderDecoder', **model_cfg)


@pytest.mark.parametrize('name', sorted(BASELINES))
def test_baseline_recipe(name):
    cfg = _load(name)
    backbone_type, arch, in_channels = BASELINES[name]
    assert cfg.custom_imports == dict(
        imports=['mesa_seg.register'], allow_failed_imports=False)
    assert cfg.model.type == 'EncoderDecoder'
    assert cfg.model.pretrained is None  # nothing is ever downloaded
    assert (cfg.model.backbone.type, cfg.model.backbone.arch) == (backbone_type,
                                                                  arch)
    assert cfg.model.backbone.get('init_cfg') is None
    assert cfg.model.neck.in_channels == in_channels
    assert MODELS.get(backbone_type).arch_zoo[arch]['embed_dims'] == in_channels
    assert cfg.model.neck.out_channels == 256 and cfg.model.neck.num_outs == 4
    assert cfg.model.decode_head.type == 'FPNHead'
    assert cfg.model.decode_head.num_classes == 150
    assert cfg.model.decode_head.norm_cfg.type == 'SyncBN'
    optimizer = cfg.optim_wrapper.optimizer
    assert optimizer == dict(type='AdamW', lr=0.0002, weight_decay=0.0001)
    [poly] = cfg.param_scheduler
    assert (poly.type, poly.power, poly.eta_min, poly.end) == ('PolyLR', 0.9,
                                                               0.0, 40000)
    assert cfg.train_cfg.max_iters == 40000
    assert cfg.train_dataloader.batch_size == 4
    assert cfg.crop_size == (512, 512)


@pytest.mark.parametrize('name', sorted(BASELINES))
def test_mesa_config_differs_only_by_mesa(name):
    base, mesa = _load(name), _load(name.replace('.py', '_mesa.py'))
    assert _strip_mesa(mesa.model) == base.model.to_dict()
    rest = set(mesa.to_dict()) | set(base.to_dict())
    for key in rest - {'model'}:
        assert mesa.get(key) == base.get(key), key


@pytest.mark.slow
@pytest.mark.parametrize('name', ['fpn_pvt_mesa.py', 'fpn_pvtv2_b0_mesa.py'])
def test_mesa_model_builds_and_trains(name):
    """Build the whole segmentor from the config and run one CPU train step."""
    init_default_scope('mmseg')
    cfg = _load(name)
    model = MODELS.build(sync_bn_cfg_to_bn(cfg.model.to_dict()))
    model.init_weights()
    converted = {n.split('.')[0] for n, _ in mesa_modules(model)}
    assert converted == {'backbone', 'neck', 'decode_head'}
    assert any('attn.qk_matmul' in n for n, _ in mesa_modules(model))

    torch.manual_seed(0)
    inputs = torch.randint(0, 255, (2, 3, 64, 64)).float()
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(img_shape=(64, 64),
                                             ori_shape=(64, 64),
                                             pad_shape=(64, 64)))
        sample.gt_sem_seg = PixelData(
            data=torch.randint(0, 150, (1, 64, 64)))
        samples.append(sample)
    data = model.data_preprocessor(dict(inputs=list(inputs),
                                        data_samples=samples), True)
    model.train()
    losses = model(**data, mode='loss')
    loss = sum(v for k, v in losses.items() if 'loss' in k)
    assert torch.isfinite(loss)
    loss.backward()
    assert model.backbone.block1[0].attn.q.weight.grad is not None
