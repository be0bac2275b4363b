"""UperNet-Swin configs: recipes, Mesa and AMP deltas, Mesa backbones build."""
import copy
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

import mesa_seg.register  # noqa: F401  (compat fixes and model registration)
from mesa_seg.cli import run_train
from mesa_seg.mesa import mesa_modules
from mmseg.registry import MODELS

CONFIGS = Path(__file__).parents[1] / 'configs'
# baseline -> (embed_dims, depths, num_heads, decode in_channels, aux in_channels)
RECIPES = {
    'upernet_swin.py':
    (96, [2, 2, 6, 2], [3, 6, 12, 24], [96, 192, 384, 768], 384),
    'upernet_swin_s.py':
    (96, [2, 2, 18, 2], [3, 6, 12, 24], [96, 192, 384, 768], 384),
    'upernet_swin_b.py':
    (128, [2, 2, 18, 2], [4, 8, 16, 32], [128, 256, 512, 1024], 512),
    'upernet_swin_amp.py':
    (96, [2, 2, 6, 2], [3, 6, 12, 24], [96, 192, 384, 768], 384),
}
MESA_PAIRS = {
    'upernet_swin.py': 'upernet_swin_mesa.py',
    'upernet_swin_s.py': 'upernet_swin_s_mesa.py',
    'upernet_swin_b.py': 'upernet_swin_b_mesa.py',
    'upernet_swin_amp.py': 'upernet_swin_mesa_amp.py',
    'demo/upernet_swin_demo.py': 'demo/upernet_swin_mesa_demo.py',
}
TINY = Path(__file__).parent / 'data' / 'tiny_upernet_swin.py'


def _load(name):
    return Config.fromfile(str(CONFIGS / name))


def _strip_mesa(cfg):
    """``cfg`` with its Mesa parts undone: ``mesa`` keys dropped, ``MesaX``
    types back to ``X``."""
    if isinstance(cfg, dict):
        out = {}
        for key, value in cfg.items():
            if key == 'mesa':
                continue
            if key == 'type' and isinstance(value, str) and value.startswith(
                    'Mesa'):
                value = value[len('Mesa'):]
            out[key] = _strip_mesa(value)
        return out
    if isinstance(cfg, (list, tuple)):
        return type(cfg)(_strip_mesa(v) for v in cfg)
    return cfg


@pytest.mark.parametrize('name', sorted(RECIPES))
def test_baseline_recipe(name):
    cfg = _load(name)
    embed_dims, depths, num_heads, in_channels, aux_channels = RECIPES[name]
    backbone = cfg.model.backbone
    assert backbone.type == 'SwinTransformer'
    assert (backbone.embed_dims, backbone.depths,
            backbone.num_heads) == (embed_dims, depths, num_heads)
    assert (backbone.window_size, backbone.drop_path_rate) == (7, 0.3)
    assert cfg.model.decode_head.in_channels == in_channels
    assert cfg.model.auxiliary_head.in_channels == aux_channels
    assert cfg.model.decode_head.num_classes == 150
    assert cfg.model.pretrained is None  # nothing is ever downloaded
    assert cfg.custom_imports.imports == ['mesa_seg.register']
    assert cfg.optim_wrapper.optimizer.lr == 6e-5


@pytest.mark.parametrize('base_name,mesa_name', sorted(MESA_PAIRS.items()))
def test_mesa_config_differs_only_by_mesa(base_name, mesa_name):
    assert (CONFIGS / mesa_name).exists(), f'{mesa_name} is missing'
    base, mesa = _load(base_name).to_dict(), _load(mesa_name).to_dict()
    assert mesa['model']['backbone']['type'] == 'MesaSwinTransformer'
    assert mesa['model']['backbone']['mesa'] == dict()
    assert _strip_mesa(mesa) == base


@pytest.mark.parametrize('base_name', ['upernet_swin.py', 'upernet_swin_mesa.py'])
def test_amp_config_differs_only_by_optim_wrapper(base_name):
    base = _load(base_name).to_dict()
    amp = _load(base_name.replace('.py', '_amp.py')).to_dict()
    wrapper = amp.pop('optim_wrapper')
    base_wrapper = base.pop('optim_wrapper')
    assert amp == base
    assert (wrapper.pop('type'), wrapper.pop('loss_scale')) == ('AmpOptimWrapper',
                                                                'dynamic')
    assert base_wrapper.pop('type') == 'OptimWrapper'
    assert wrapper == base_wrapper  # same optimizer and paramwise_cfg


@pytest.mark.parametrize('name', sorted(set(MESA_PAIRS.values()) - {
    'demo/upernet_swin_mesa_demo.py'}))
def test_mesa_backbone_builds(name):
    cfg = _load(name)
    backbone = MODELS.build(copy.deepcopy(cfg.model.backbone))
    assert len(mesa_modules(backbone)) > 0
    last_block = backbone.stages[-1].blocks[-1]
    heads = cfg.model.backbone.num_heads[-1]
    assert last_block.attn.w_msa.softmax.quantizer.groups == heads
    assert last_block.ffn.layers[1].quantizer.groups == heads


@pytest.mark.slow
def test_mesa_swin_trains_and_resumes(tmp_path, data_options):
    """The tiny UperNet with the Mesa backbone: train, checkpoint the running
    ranges, resume from them."""
    wd = tmp_path / 'wd'
    opts = [
        '--work-dir', wd, '--cfg-options', *data_options,
        'model.backbone.type=MesaSwinTransformer'
    ]
    assert run_train([str(a) for a in [TINY, *opts]]) == 0
    state = torch.load(wd / 'iter_2.pth', weights_only=False)['state_dict']
    key = 'backbone.stages.3.blocks.0.attn.w_msa.softmax.quantizer.initialized'
    assert state[key].tolist() == [True] * 8  # one range per head, learned
    assert run_train(
        [str(a) for a in [TINY, '--resume', *opts, 'train_cfg.max_iters=3']
         ]) == 0
    assert (wd / 'iter_3.pth').is_file()
