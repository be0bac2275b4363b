"""mesa_seg.mesa.modules and .policy: drop-in modules, state_dict, mesafy_."""
import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from mesa_seg.mesa import (LAYER_TYPES, QUANTIZER_ATTRS, ActivationQuantizer, MatMul,
                           MesaBatchNorm2d, MesaConv2d, MesaLinear, MesaMatMul, MesaModule,
                           MesaPolicy, MesaReLU, QuantizerConfig, mesa_modules, mesafy_,
                           set_mesa_enabled)
from mesa_utils import eager_by_default, saved_bytes  # noqa: F401  (fixture)

# A quantizer's state: running range buffers (and whatever else it keeps).
QUANT_KEYS = tuple(ActivationQuantizer().state_dict())


class Attention(nn.Module):
    def __init__(self, dim=16, num_heads=2):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.qk = MatMul()
        self.softmax = nn.Softmax(dim=-1)
        self.av = MatMul()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = self.softmax(self.qk(q, k.transpose(-2, -1)))
        return self.proj(self.av(attn, v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim=16, num_heads=4, attn_heads=2):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, attn_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class Net(nn.Module):
    """Every convertible layer type; a tuple ``num_heads`` (as on backbones)."""

    def __init__(self):
        super().__init__()
        self.num_heads = (4, 8)  # not an int: ignored by groups='heads'
        self.block = Block()
        self.conv = nn.Conv2d(16, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):  # (B, 16 tokens, 16 channels)
        x = self.block(x)
        fmap = x.transpose(1, 2).reshape(x.shape[0], 16, 4, 4)
        return self.head(self.relu(self.bn(self.conv(fmap))).mean((2, 3)))


def _net_pair(seed=0):
    torch.manual_seed(seed)
    ref = Net()
    return ref, mesafy_(copy.deepcopy(ref))


def _step(model, x, seed=1):
    """One training forward/backward; returns output and parameter gradients."""
    torch.manual_seed(seed)
    y = model(x)
    grads = torch.autograd.grad(y.square().sum(), list(model.parameters()))
    return y, grads


def _x(seed=2):
    return torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ modules
TWINS = [
    nn.Linear(12, 6, bias=False),
    nn.Conv2d(4, 8, 3, stride=2, padding=1, dilation=2, groups=2, padding_mode='reflect'),
    nn.LayerNorm(12, eps=1e-3),
    nn.GELU(approximate='tanh'),
    nn.Softmax(dim=1),
    nn.BatchNorm2d(4, eps=1e-3, momentum=0.3, affine=False),
    nn.ReLU(inplace=True),
    MatMul(),
]


@pytest.mark.parametrize('module', TWINS, ids=lambda m: type(m).__name__)
def test_from_float_keeps_options_parameters_and_keys(module):
    mesa_cls = next(m for t, m in LAYER_TYPES.values() if t is type(module))
    config = QuantizerConfig(groups=2, momentum=0.5)
    cls, children, state = type(module), dict(module.named_children()), {
        k: v.clone() for k, v in module.state_dict().items()}
    twin = mesa_cls.from_float(module, config)
    assert isinstance(twin, type(module)) and isinstance(twin, MesaModule)
    # the original is untouched: same class (not converted in place), no
    # quantizers added, same state
    assert type(module) is cls and not isinstance(module, MesaModule)
    assert dict(module.named_children()) == children
    assert module.state_dict().keys() == state.keys()
    assert all(torch.equal(module.state_dict()[k], v) for k, v in state.items())
    assert twin.extra_repr().startswith(module.extra_repr()) or \
        module.extra_repr() in twin.extra_repr()
    # Shared (not copied) parameters: an optimizer built before stays valid.
    assert [id(p) for p in twin.parameters()] == [id(p) for p in module.parameters()]
    keys = set(twin.state_dict())
    plain = set(module.state_dict())
    assert plain <= keys
    extra = keys - plain
    assert all(k.rsplit('.', 1)[1] in QUANT_KEYS for k in extra)
    quantizers = [n for n, _ in twin.named_children() if n in QUANTIZER_ATTRS]
    assert len(extra) == len(QUANT_KEYS) * len(quantizers)
    assert all(twin.get_submodule(n).config is config for n in quantizers)
    assert {'running_min', 'running_range', 'initialized'} <= set(QUANT_KEYS)
    # Quantizer state is buffers only.
    assert len(list(twin.parameters())) == len(list(module.parameters()))


@pytest.mark.parametrize('module', TWINS, ids=lambda m: type(m).__name__)
def test_to_float_gives_back_the_plain_module(module):
    mesa_cls = next(m for t, m in LAYER_TYPES.values() if t is type(module))
    plain = mesa_cls.from_float(module).to_float()
    assert type(plain) is type(module)
    assert set(plain.state_dict()) == set(module.state_dict())
    assert not hasattr(plain, 'mesa_enabled')
    assert [id(p) for p in plain.parameters()] == [id(p) for p in module.parameters()]
    assert plain.extra_repr() == module.extra_repr()


def test_constructors_take_one_mesa_config():
    config = QuantizerConfig(groups=2, momentum=0.5, stochastic_rounding=False)
    lin = MesaLinear(8, 4, mesa_config=config, enabled=False)
    assert lin.quantizer.config is config and lin.quantizer.groups == 2
    assert not lin.mesa_enabled
    # The torch class keeps its own argument names: conv groups vs Mesa groups,
    # BatchNorm momentum vs the running-range momentum.
    conv = MesaConv2d(8, 4, 3, groups=2, mesa_config=QuantizerConfig(groups=4))
    assert conv.groups == 2 and conv.quantizer.groups == 4
    bn = MesaBatchNorm2d(8, momentum=0.3, mesa_config=config)
    assert bn.momentum == 0.3 and bn.quantizer.config.momentum == 0.5
    matmul = MesaMatMul(mesa_config=config)
    assert matmul.quantizer_a.config is matmul.quantizer_b.config is config
    assert MesaReLU(inplace=True, enabled=False).inplace
    assert MesaLinear(8, 4).quantizer.config == QuantizerConfig()
    with pytest.raises(ValueError, match='does not divide'):
        MesaLinear(10, 4, mesa_config=QuantizerConfig(groups=4))


def test_quantizer_attrs_name_every_quantizer_submodule():
    attention = {'quantizer_in_q', 'quantizer_in_k', 'quantizer_in_v', 'quantizer_q',
                 'quantizer_k', 'quantizer_v', 'quantizer_attn', 'quantizer_out'}
    assert QUANTIZER_ATTRS == {'quantizer', 'quantizer_a', 'quantizer_b'} | attention
    _, model = _net_pair()
    found = {n.rsplit('.', 1)[-1] for n, m in model.named_modules()
             if isinstance(m, ActivationQuantizer)}
    assert found == QUANTIZER_ATTRS - attention  # Net has no MultiheadAttention
    mha = mesafy_(nn.Sequential(nn.MultiheadAttention(16, 2)))
    assert {n.rsplit('.', 1)[-1] for n, m in mha.named_modules()
            if isinstance(m, ActivationQuantizer)} == attention


def test_plain_op_when_nothing_needs_a_gradient():
    gelu = LAYER_TYPES['GELU'][1]()
    x = torch.randn(4, 8)  # no grad, no parameters
    _, nbytes = saved_bytes(lambda: gelu(x))
    assert nbytes == 0 and not gelu.quantizer.initialized.any()


def test_conv_with_asymmetric_same_padding_runs_the_plain_op():
    # An even kernel's 'same' padding is asymmetric: not expressible as the int
    # padding of the fused op, so the module documents a plain-op fallback.
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 2, padding='same')
    twin = MesaConv2d.from_float(copy.deepcopy(conv))
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    y_ref, ref_bytes = saved_bytes(lambda: conv(x), conv.parameters())
    y, nbytes = saved_bytes(lambda: twin(x), twin.parameters())
    assert torch.equal(y, y_ref) and nbytes == ref_bytes


# ------------------------------------------------------------- state_dict
def test_state_dict_round_trip_with_quantizer_buffers():
    _, model = _net_pair()
    for seed in (3, 4):
        _step(model, _x(seed))
    state = model.state_dict()
    quant = [k for k in state if k.rsplit('.', 1)[1] in QUANT_KEYS]
    assert quant and all(state[k].any() for k in quant if k.endswith('initialized'))
    param_ids = {id(p) for p in model.parameters()}
    assert not any(id(b) in param_ids for b in model.buffers())
    _, fresh = _net_pair(seed=9)
    assert fresh.load_state_dict(state, strict=True).missing_keys == []
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]), k
    # Same weights, estimates and RNG state: the same training step.
    for a, b in zip(_step(model, _x(5))[1], _step(fresh, _x(5))[1]):
        assert torch.equal(a, b)


def test_plain_torch_checkpoint_loads_strictly():
    ref, _ = _net_pair()
    _, model = _net_pair(seed=7)
    result = model.load_state_dict(ref.state_dict(), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for name, p in ref.named_parameters():
        assert torch.equal(model.get_parameter(name), p)
    # The estimates are still unset: they initialise from the first batch.
    assert not any(m.quantizer.initialized.any() for _, m in mesa_modules(model)
                   if hasattr(m, 'quantizer'))
    model.eval(), ref.eval()
    assert torch.equal(model(_x()), ref(_x()))


def test_mesa_checkpoint_into_plain_model_only_adds_quantizer_keys():
    ref, model = _net_pair()
    result = copy.deepcopy(ref).load_state_dict(model.state_dict(), strict=False)
    assert result.missing_keys == []
    assert result.unexpected_keys and all(k.rsplit('.', 1)[1] in QUANT_KEYS
                                          for k in result.unexpected_keys)


def test_deepcopy_of_a_converted_model():
    _, model = _net_pair()
    _step(model, _x())
    clone = copy.deepcopy(model)
    for k, v in model.state_dict().items():
        assert torch.equal(clone.state_dict()[k], v)
    assert len(mesa_modules(clone)) == len(mesa_modules(model))


# -------------------------------------------------------------- converter
def test_converter_swaps_every_layer_type():
    _, model = _net_pair()
    kinds = {type(m).__name__ for _, m in mesa_modules(model)}
    # Net has no MultiheadAttention (its conversion: tests/test_attention.py)
    # nor SyncBatchNorm (tests/test_sync_batchnorm.py)
    assert kinds == {'Mesa' + t for t in LAYER_TYPES} - {'MesaMultiheadAttention',
                                                         'MesaSyncBatchNorm'}
    assert not any(type(m) in {t for t, _ in LAYER_TYPES.values()} for m in model.modules())
    assert model.block.norm1.eps == 1e-6 and model.relu.inplace
    # Converting again finds nothing new (exact type match).
    n = len(mesa_modules(model))
    assert len(mesa_modules(mesafy_(model))) == n


def test_converter_output_identical_in_eval_and_when_disabled():
    ref, model = _net_pair()
    ref.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(model(_x()), ref(_x()))
    ref.train(), model.train()
    assert set_mesa_enabled(model, False) == len(mesa_modules(model))
    (y_ref, g_ref), (y, g) = _step(ref, _x()), _step(model, _x())
    assert torch.equal(y, y_ref)
    assert all(torch.equal(a, b) for a, b in zip(g_ref, g))
    assert torch.equal(model.bn.running_mean, ref.bn.running_mean)
    assert not any(m.quantizer.initialized.any() for _, m in mesa_modules(model)
                   if hasattr(m, 'quantizer'))
    # Disabled saves what torch saves; enabled saves far less.
    params = list(model.parameters()) + list(model.buffers())
    _, off = saved_bytes(lambda: model(_x()), params)
    set_mesa_enabled(model, True)
    y_on, on = saved_bytes(lambda: model(_x()), params)
    _, torch_bytes = saved_bytes(lambda: ref(_x()), list(ref.parameters()) + list(ref.buffers()))
    assert off == torch_bytes
    assert on < 0.4 * torch_bytes
    assert torch.equal(y_on, ref(_x()))


def test_converter_keeps_an_existing_optimizer_working():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mesafy_(model)
    before = model.head.weight.detach().clone()
    model(_x()).square().sum().backward()
    opt.step()
    assert not torch.equal(model.head.weight, before)


def test_root_layer_and_shared_layers():
    lin = nn.Linear(8, 8)
    out = mesafy_(lin)
    assert isinstance(out, MesaLinear) and out.weight is lin.weight
    # One layer used twice stays one (compressed) layer, in one parent or two.
    shared = nn.Linear(8, 8)
    seq = nn.Sequential(shared, nn.ReLU(), shared)
    mesafy_(seq)
    assert seq[0] is seq[2] and isinstance(seq[0], MesaLinear)
    shared = nn.Linear(8, 8)
    model = nn.Sequential(nn.Sequential(shared), nn.Sequential(shared))
    mesafy_(model)
    assert model[0][0] is model[1][0] and isinstance(model[1][0], MesaLinear)


def test_subclasses_of_torch_layers_are_not_converted():
    # e.g. MultiheadAttention's NonDynamicallyQuantizableLinear: its owner calls
    # F.multi_head_attention_forward with the weights, never its forward.
    mha = nn.MultiheadAttention(8, 2)
    mesafy_(mha)
    assert not isinstance(mha.out_proj, MesaModule)


def _groups(model):
    return {n: m.quantizer.groups for n, m in mesa_modules(model) if hasattr(m, 'quantizer')}


def test_groups_heads_resolution():
    _, model = _net_pair()
    g = _groups(model)
    assert g['block.attn.qkv'] == g['block.attn.proj'] == 2     # Attention.num_heads
    assert g['block.attn.softmax'] == 2 and model.block.attn.qk.quantizer_b.groups == 2
    assert g['block.norm1'] == g['block.fc1'] == g['block.act'] == 4  # Block.num_heads
    assert g['conv'] == g['bn'] == g['head'] == 1                # root's tuple ignored
    # A layer's own num_heads counts too (innermost = itself).
    lin = nn.Linear(12, 12)
    lin.num_heads = 3
    model = nn.Sequential(lin)
    model.num_heads = 2
    assert mesafy_(model)[0].quantizer.groups == 3


def test_groups_int_and_channels():
    torch.manual_seed(0)
    model = mesafy_(Net(), dict(groups=2))
    assert set(_groups(model).values()) == {2}
    model = mesafy_(Net(), dict(groups='channels'))
    g = _groups(model)
    assert g['conv'] == 16 and g['bn'] == 8 and g['block.fc2'] == 32
    assert g['block.norm1'] == 16 and g['block.act'] == 1 and g['block.attn.softmax'] == 1
    assert model(_x()).shape == (2, 4)


def test_include_exclude_and_filter_fn():
    torch.manual_seed(0)
    model = mesafy_(Net(), dict(include=[r'^block\.'], exclude=[r'norm']))
    names = {n for n, _ in mesa_modules(model)}
    assert 'block.fc1' in names and 'block.attn.qk' in names
    assert not any('norm' in n for n in names) and 'conv' not in names
    model = mesafy_(Net(), dict(layers=['Linear']),
                    filter_fn=lambda mod, name: mod.out_features != 4)
    names = {n for n, _ in mesa_modules(model)}
    assert names == {'block.attn.qkv', 'block.attn.proj', 'block.fc1', 'block.fc2'}


def test_disabled_policy_leaves_the_model_untouched():
    ref, _ = _net_pair()
    model = mesafy_(copy.deepcopy(ref), dict(enabled=False))
    assert mesa_modules(model) == []


# ----------------------------------------------------------------- policy
def test_policy_from_cfg():
    assert MesaPolicy.from_cfg(None) == MesaPolicy()
    policy = MesaPolicy(groups=4)
    assert MesaPolicy.from_cfg(policy) is policy
    # Config dicts hold lists and bare strings: normalised to tuples.
    policy = MesaPolicy.from_cfg(dict(layers=['Linear', 'GELU'], include='attn',
                                      exclude=['patch_embed'], momentum=0.99,
                                      stochastic_rounding=False, sync_stats=True))
    assert policy.layers == ('Linear', 'GELU') and policy.include == ('attn',)
    assert policy.exclude == ('patch_embed',) and policy.momentum == 0.99
    hash(policy)  # frozen
    with pytest.raises(TypeError, match='dict or MesaPolicy'):
        MesaPolicy.from_cfg(['Linear'])


def test_policy_options_reach_the_quantizers():
    torch.manual_seed(0)
    model = mesafy_(Net(), dict(momentum=0.5, stochastic_rounding=False, sync_stats=True,
                                widen_to_batch=True))
    configs = {m.config for m in model.modules() if isinstance(m, ActivationQuantizer)}
    # The policy's options, with each layer's resolved groups.
    assert {c.groups for c in configs} == {1, 2, 4}
    assert configs == {QuantizerConfig(groups=g, momentum=0.5, stochastic_rounding=False,
                                       sync_stats=True, widen_to_batch=True)
                       for g in (1, 2, 4)}
    plain = mesafy_(Net(), dict())
    assert not any(m.config.widen_to_batch for m in plain.modules()
                   if isinstance(m, ActivationQuantizer))


def test_policy_builds_the_quantizer_config():
    policy = MesaPolicy(groups='heads', momentum=0.8, widen_to_batch=True)
    assert policy.quantizer_config(groups=3) == QuantizerConfig(
        groups=3, momentum=0.8, widen_to_batch=True)
    # The defaults are written once, on QuantizerConfig.
    assert MesaPolicy().quantizer_config(groups=1) == QuantizerConfig()


@pytest.mark.parametrize('cfg, error', [
    (dict(group=2), r"unknown option\(s\) \['group'\]"),
    (dict(bits=4), 'bits=4 is not supported'),
    (dict(layers=['Linear', 'Conv1d']), r"unknown layer type\(s\) \['Conv1d'\]"),
    (dict(groups='rows'), 'groups must be'),
    (dict(groups=0), 'groups must be'),
    (dict(momentum=1.0), 'momentum'),
    (dict(include=['(']), 'bad regex'),
])
def test_policy_errors(cfg, error):
    with pytest.raises(ValueError, match=error):
        mesafy_(Net(), cfg)


def test_groups_not_dividing_channels_name_the_layer():
    with pytest.raises(ValueError, match=r"cannot convert 'conv'.*groups=3 does not divide"):
        mesafy_(Net(), dict(groups=3))
    # 'heads' that do not divide a layer's channels: same clear error.
    model = nn.Sequential(nn.Linear(10, 4))
    model.num_heads = 4
    with pytest.raises(ValueError, match=r"cannot convert '0'.*does not divide"):
        mesafy_(model)


def test_groups_not_dividing_heads_name_the_layer():
    # Softmax and MatMul group along the head axis, whose size they cannot know
    # before the forward pass: mesafy_ checks the enclosing module's num_heads.
    model = nn.Sequential()
    model.add_module('attn', Attention(dim=16, num_heads=2))
    with pytest.raises(ValueError, match=r"^Mesa: cannot convert 'attn\.qk': groups=4 does not "
                                         r"divide the 2 attention heads of attn$"):
        mesafy_(model, dict(groups=4))
    # Where the heads are the root's own, the message names its class.
    with pytest.raises(ValueError, match=r"'softmax': groups=4 does not divide the 2 attention "
                                         r"heads of Attention$"):
        mesafy_(Attention(dim=16, num_heads=2), dict(groups=4, layers=['Softmax']))
    # Dividing counts, and layers outside any module with heads, convert.
    assert isinstance(mesafy_(Attention(dim=16, num_heads=4), dict(groups=2)).qk, MesaMatMul)
    assert isinstance(mesafy_(nn.Sequential(MatMul()), dict(groups=3))[0], MesaMatMul)
    # Excluded layers are not checked.
    mesafy_(Attention(dim=16, num_heads=2), dict(groups=4, layers=['Linear']))


def test_core_imports_no_openmmlab_package():
    # The Mesa core is torch only: importing it must not pull in mm* packages.
    code = ("import sys, mesa_seg.mesa; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('mmseg', 'mmengine', 'mmcv')]; "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
