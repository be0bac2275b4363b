"""SegFormer (MiT-B0/B1/B2) and UperNet-DeiT-S configs: mmseg's recipes, Mesa
deltas only, models build and train a step."""
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
from mesa_seg.mesa import MesaMultiheadAttention, mesa_modules
from mesa_utils import eager_by_default  # noqa: F401  (fixture: eager Mesa kernels)

CONFIGS = Path(__file__).parents[1] / 'configs'
# baseline -> (embed_dims, num_layers, num_heads, decode in_channels)
SEGFORMER = {
    'segformer_mit_b0.py': (32, [2, 2, 2, 2], [1, 2, 5, 8], [32, 64, 160, 256]),
    'segformer_mit_b1.py': (64, [2, 2, 2, 2], [1, 2, 5, 8], [64, 128, 320, 512]),
    'segformer_mit_b2.py': (64, [3, 4, 6, 3], [1, 2, 5, 8], [64, 128, 320, 512]),
}
PAIRS = {name: name.replace('.py', '_mesa.py')
         for name in [*SEGFORMER, 'upernet_deit_s.py']}
SCHEDULE = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]


def _load(name):
    return Config.fromfile(str(CONFIGS / name))


def _common_recipe(cfg):
    assert cfg.custom_imports == dict(imports=['mesa_seg.register'],
                                      allow_failed_imports=False)
    assert cfg.model.type == 'EncoderDecoder'
    assert cfg.model.pretrained is None  # nothing is ever downloaded
    assert cfg.model.backbone.get('init_cfg') is None
    assert cfg.model.decode_head.num_classes == 150
    assert cfg.model.decode_head.norm_cfg.type == 'SyncBN'
    assert cfg.crop_size == (512, 512) and cfg.data_preprocessor.size == (512, 512)
    assert cfg.optim_wrapper.type == 'OptimWrapper'
    assert cfg.optim_wrapper.optimizer == dict(type='AdamW', lr=0.00006, betas=(0.9, 0.999),
                                               weight_decay=0.01)
    assert cfg.param_scheduler == SCHEDULE
    assert cfg.train_cfg.max_iters == 160000
    assert cfg.train_dataloader.batch_size == 2  # x 8 GPUs = 16
    assert cfg.val_dataloader.batch_size == 1


@pytest.mark.parametrize('name', sorted(SEGFORMER))
def test_segformer_recipe(name):
    """mmseg's segformer_mit-bX_8xb2-160k_ade20k-512x512."""
    cfg = _load(name)
    _common_recipe(cfg)
    embed_dims, num_layers, num_heads, in_channels = SEGFORMER[name]
    backbone = cfg.model.backbone
    assert backbone.type == 'MixVisionTransformer'
    assert (backbone.embed_dims, backbone.num_layers, backbone.num_heads) == (
        embed_dims, num_layers, num_heads)
    assert (backbone.patch_sizes, backbone.sr_ratios, backbone.mlp_ratio) == (
        [7, 3, 3, 3], [8, 4, 2, 1], 4)
    assert (backbone.drop_rate, backbone.attn_drop_rate, backbone.drop_path_rate) == (
        0.0, 0.0, 0.1)
    head = cfg.model.decode_head
    assert (head.type, head.in_channels, head.channels) == ('SegformerHead', in_channels, 256)
    assert 'auxiliary_head' not in cfg.model and 'neck' not in cfg.model
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys == {
        'pos_block': dict(decay_mult=0.), 'norm': dict(decay_mult=0.),
        'head': dict(lr_mult=10.)}
    assert (cfg.train_dataloader.num_workers, cfg.val_dataloader.num_workers) == (2, 4)


def test_upernet_deit_s_recipe():
    """mmseg's vit_deit-s16_upernet_8xb2-160k_ade20k-512x512 (42.87 mIoU)."""
    cfg = _load('upernet_deit_s.py')
    _common_recipe(cfg)
    backbone = cfg.model.backbone
    assert backbone.type == 'VisionTransformer'
    assert (backbone.embed_dims, backbone.num_heads, backbone.num_layers) == (384, 6, 12)
    assert (backbone.img_size, backbone.patch_size, backbone.out_indices) == (
        (512, 512), 16, (2, 5, 8, 11))
    assert (backbone.drop_path_rate, backbone.with_cls_token, backbone.norm_eval) == (
        0.1, True, False)
    assert backbone.norm_cfg == dict(type='LN', eps=1e-6)
    assert cfg.model.neck is None
    assert cfg.model.decode_head.type == 'UPerHead'
    assert cfg.model.decode_head.in_channels == [384, 384, 384, 384]
    assert cfg.model.decode_head.channels == 512
    assert (cfg.model.auxiliary_head.type, cfg.model.auxiliary_head.in_channels,
            cfg.model.auxiliary_head.in_index) == ('FCNHead', 384, 3)
    assert cfg.model.auxiliary_head.num_classes == 150
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys == {
        'pos_embed': dict(decay_mult=0.), 'cls_token': dict(decay_mult=0.),
        'norm': dict(decay_mult=0.)}


@pytest.mark.parametrize('base_name,mesa_name', sorted(PAIRS.items()))
def test_mesa_config_differs_only_by_mesa(base_name, mesa_name):
    base, mesa = _load(base_name).to_dict(), _load(mesa_name).to_dict()
    model = mesa['model']
    # The Mesa keys, literally: segmentor type and its (head) policy, backbone
    # type and its policy; nothing else differs.
    backbone_type = base['model']['backbone']['type']
    assert model.pop('type') == 'MesaEncoderDecoder'
    assert model.pop('mesa') == dict()
    assert model['backbone'].pop('type') == 'Mesa' + backbone_type
    assert model['backbone'].pop('mesa') == dict()
    base['model'].pop('type')
    base['model']['backbone'].pop('type')
    assert mesa == base


def _train_step(model, size=64):
    torch.manual_seed(0)
    inputs = torch.randint(0, 255, (2, 3, size, size)).float()
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(
            img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, size, size)))
        samples.append(sample)
    data = model.data_preprocessor(dict(inputs=list(inputs), data_samples=samples), True)
    model.train()
    losses = model(**data, mode='loss')
    loss = sum(v for k, v in losses.items() if 'loss' in k)
    assert torch.isfinite(loss)
    loss.backward()


@pytest.mark.slow
@pytest.mark.parametrize('name,parts', [
    ('segformer_mit_b0_mesa.py', {'backbone', 'decode_head'}),
    ('upernet_deit_s_mesa.py', {'backbone', 'decode_head', 'auxiliary_head'}),
])
def test_mesa_model_builds_and_trains(name, parts):
    """The whole segmentor from the config (SyncBN -> BN for one CPU process),
    one training step at 64x64."""
    init_default_scope('mmseg')
    cfg = _load(name)
    model_cfg = copy.deepcopy(sync_bn_cfg_to_bn(cfg.model.to_dict()))
    if 'deit' in name:
        model_cfg['backbone']['img_size'] = (64, 64)  # a smaller position embedding
    model = MODELS.build(model_cfg)
    model.init_weights()
    converted = {n.split('.')[0] for n, _ in mesa_modules(model)}
    assert converted == parts
    assert any(isinstance(m, MesaMultiheadAttention) for m in model.backbone.modules())
    _train_step(model)
    attn = next(m for m in model.backbone.modules() if isinstance(m, MesaMultiheadAttention))
    assert attn.in_proj_weight.grad is not None
    assert bool(attn.quantizer_attn.initialized.all())  # need_weights=True path ran
