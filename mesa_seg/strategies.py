"""The memory-saving strategies a user weighs against each other, in one place.

A strategy is a set of knobs applied to a config's model and optimizer
wrapper: the fused resize + cross-entropy loss, Mesa's 8-bit activations,
mixed precision and activation checkpointing of the backbone blocks.
:func:`apply_strategy` edits an mmengine ``Config`` so it trains with exactly
those knobs, whatever the config had before: strategies are *absolute*, so
``fp32`` applied to ``configs/upernet_swin_mesa.py`` gives the model of
``configs/upernet_swin.py``.

==========  ==============================================================
fp32        the config's model as mmseg runs it (``EncoderDecoder``, mmseg's
            loss, the backbone's plain class)
fused_loss  fp32 + the exact fused resize + cross-entropy (no Mesa)
amp         mixed precision (fp16 + dynamic loss scale on CUDA, bf16 on CPU)
cp          activation checkpointing of every backbone block
sac         selective activation checkpointing of the backbone blocks
mesa        Mesa backbone + Mesa neck/heads + fused loss
mesa_amp    mesa + amp
mesa_cp     mesa + cp
==========  ==============================================================

``tools/benchmark.py`` measures them side by side; ``tools/memory_report.py``,
``tools/train.py`` and ``tools/test.py`` take ``--strategy NAME``
(:func:`add_strategy_argument`).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

from .errors import UsageError

__all__ = [
    'Strategy', 'STRATEGIES', 'LOSS_FUSED', 'LOSS_FUSED_8BIT', 'LOSS_MMSEG', 'get_strategy',
    'apply_strategy', 'describe', 'strategy_table', 'add_strategy_argument'
]

#: How a result names the loss its heads computed (see ``mesa_seg.memory``).
LOSS_FUSED = 'fused resize + CE'
LOSS_FUSED_8BIT = 'fused resize + CE, logits kept in 8 bits (Mesa)'
LOSS_MMSEG = "mmseg's CE (upsample, then CE)"

Checkpointing = Union[bool, str]


@dataclass(frozen=True)
class Strategy:
    """One strategy's knobs.

    Args:
        name (str): the name users pass (``--strategy NAME``).
        description (str): one line: what it includes.
        mesa (bool): Mesa 8-bit activations in the backbone (its Mesa class,
            ``mesa=dict()``) and in the neck and heads (``MesaEncoderDecoder``
            with ``mesa=dict()``), with the fused loss, which then keeps its
            logits in 8 bits too.
        fused_loss (bool): the exact fused resize + cross-entropy
            (``MesaEncoderDecoder``); implied by ``mesa``.
        amp (bool): mixed precision (``AmpOptimWrapper``, dynamic loss scale;
            bf16 ``CPUAmpOptimWrapper`` without CUDA).
        checkpointing (bool | str): the backbone's ``with_cp``: False, True
            (every block) or ``'selective'``.
    """
    name: str
    description: str
    mesa: bool = False
    fused_loss: bool = False
    amp: bool = False
    checkpointing: Checkpointing = False

    def __post_init__(self):
        if self.checkpointing not in (False, True, 'selective'):
            raise ValueError(f'checkpointing must be False, True or "selective", '
                             f'got {self.checkpointing!r}')
        if self.mesa and not self.fused_loss:
            raise ValueError('a Mesa strategy includes the fused loss')

    @property
    def loss(self) -> str:
        if self.mesa:
            return LOSS_FUSED_8BIT
        return LOSS_FUSED if self.fused_loss else LOSS_MMSEG

    @property
    def precision(self) -> str:
        return 'AMP (fp16 on CUDA, bf16 on CPU)' if self.amp else 'fp32'

    @property
    def activations(self) -> str:
        return 'Mesa 8-bit (backbone, neck, heads, loss logits)' if self.mesa \
            else 'full precision'

    @property
    def checkpointing_label(self) -> str:
        return {False: 'none', True: 'every backbone block',
                'selective': 'selective, backbone blocks'}[self.checkpointing]


def _strategies(*items: Strategy) -> Dict[str, Strategy]:
    return {s.name: s for s in items}


#: Every strategy, in the order reports list them (``fp32`` first: every
#: ratio is to it).
STRATEGIES: Dict[str, Strategy] = _strategies(
    Strategy('fp32', "the config's model as mmseg runs it: EncoderDecoder, mmseg's loss "
             '(upsample, then cross-entropy), plain backbone, fp32'),
    Strategy('fused_loss', 'fp32 + the exact fused resize + cross-entropy loss (no Mesa)',
             fused_loss=True),
    Strategy('amp', "mixed precision (fp16 + dynamic loss scale on CUDA, bf16 on CPU), "
             "mmseg's loss", amp=True),
    Strategy('cp', "activation checkpointing of every backbone block (with_cp=True), "
             "mmseg's loss", checkpointing=True),
    Strategy('sac', 'selective activation checkpointing of the backbone blocks '
             "(with_cp='selective': matmul/conv outputs kept), mmseg's loss",
             checkpointing='selective'),
    Strategy('mesa', "Mesa 8-bit activations in backbone, neck, heads and the loss's logits "
             '+ fused loss',
             mesa=True, fused_loss=True),
    Strategy('mesa_amp', 'mesa + mixed precision', mesa=True, fused_loss=True, amp=True),
    Strategy('mesa_cp', 'mesa + activation checkpointing of every backbone block',
             mesa=True, fused_loss=True, checkpointing=True),
)


@dataclass(frozen=True)
class _Family:
    """A backbone's plain class, its Mesa twin and the class that takes
    ``with_cp='selective'`` without Mesa."""
    base: str
    mesa: str
    selective: str


# mmseg's SwinTransformer, MixVisionTransformer and VisionTransformer take only
# a bool with_cp: their Mesa twins with mesa=None are the same models and also
# take 'selective'. This package's PVT/PVTv2 take it themselves.
_FAMILIES: Tuple[_Family, ...] = (
    _Family('SwinTransformer', 'MesaSwinTransformer', 'MesaSwinTransformer'),
    _Family('PVT', 'MesaPVT', 'PVT'),
    _Family('PVTv2', 'MesaPVTv2', 'PVTv2'),
    _Family('MixVisionTransformer', 'MesaMixVisionTransformer', 'MesaMixVisionTransformer'),
    _Family('VisionTransformer', 'MesaVisionTransformer', 'MesaVisionTransformer'),
)
# Options of the Mesa backbones that change the model (torch's fused attention
# instead of mmseg's explicit one): part of a Mesa strategy, so the others,
# which promise mmseg's model, drop them.
_MESA_ONLY_BACKBONE_KEYS = ('fused_attention',)
_SEGMENTORS = ('EncoderDecoder', 'MesaEncoderDecoder')
_OPTIM_WRAPPERS = ('OptimWrapper', 'AmpOptimWrapper', 'CPUAmpOptimWrapper')


def _choices() -> str:
    return ', '.join(STRATEGIES)


def get_strategy(name: str) -> Strategy:
    """The :class:`Strategy` called ``name``.

    Raises:
        UsageError: unknown name (the message lists the valid ones).
    """
    try:
        return STRATEGIES[name]
    except (KeyError, TypeError):
        raise UsageError(f'unknown strategy {name!r}; choose from: {_choices()}') from None


def _split_type(type_) -> Tuple[str, Optional[str]]:
    """``'mmseg.SwinTransformer'`` -> ``('mmseg.', 'SwinTransformer')``; a class
    -> ``('', its name)``; None -> ``('', None)``."""
    if type_ is None:
        return '', None
    if not isinstance(type_, str):
        return '', getattr(type_, '__name__', str(type_))
    scope, dot, name = type_.rpartition('.')
    return scope + dot, name


def _family(type_name: Optional[str]) -> Optional[_Family]:
    return next((f for f in _FAMILIES if type_name in (f.base, f.mesa)), None)


def _mesa_policy(node) -> dict:
    """The config's Mesa policy dict if it has one (``enabled=False`` dropped:
    the strategy turns Mesa on), else ``dict()`` (the class's defaults)."""
    policy = node.get('mesa')
    if not isinstance(policy, dict):
        return dict()
    policy = dict(policy)
    if policy.get('enabled', True) is False:
        policy.pop('enabled')
    return policy


def _apply_backbone(model, s: Strategy) -> None:
    backbone = model.get('backbone')
    if backbone is None:
        if s.mesa or s.checkpointing:
            raise UsageError(f'strategy {s.name!r} needs a model with a backbone')
        return
    scope, type_name = _split_type(backbone.get('type'))
    family = _family(type_name)
    if family is None:
        if s.mesa or s.checkpointing == 'selective':
            known = ', '.join(f'{f.base}/{f.mesa}' for f in _FAMILIES)
            raise UsageError(
                f'strategy {s.name!r} needs a backbone with a Mesa twin ({known}); '
                f'this config has {type_name}. Strategies for any backbone: '
                + ', '.join(n for n, t in STRATEGIES.items()
                            if not t.mesa and t.checkpointing != 'selective'))
    else:
        target = family.mesa if s.mesa else (
            family.selective if s.checkpointing == 'selective' else family.base)
        backbone['type'] = scope + target
        if target == family.mesa:
            backbone['mesa'] = _mesa_policy(backbone) if s.mesa else None
        else:
            backbone.pop('mesa', None)
        if not s.mesa:
            for key in _MESA_ONLY_BACKBONE_KEYS:
                backbone.pop(key, None)
    if s.checkpointing:
        backbone['with_cp'] = s.checkpointing
    else:
        backbone.pop('with_cp', None)  # every backbone's default: no checkpointing


def _apply_segmentor(model, s: Strategy) -> None:
    scope, type_name = _split_type(model.get('type', 'EncoderDecoder'))
    if type_name not in _SEGMENTORS:
        if s.fused_loss:
            raise UsageError(
                f'strategy {s.name!r} needs an EncoderDecoder or MesaEncoderDecoder '
                f'segmentor (it becomes MesaEncoderDecoder); this config has {type_name}')
        return
    if s.fused_loss:
        model['type'] = scope + 'MesaEncoderDecoder'
        model['mesa'] = _mesa_policy(model) if s.mesa else None
    else:
        model['type'] = scope + 'EncoderDecoder'
        model.pop('mesa', None)
    # MesaEncoderDecoder's default is the fused loss; EncoderDecoder has no such key
    model.pop('fused_loss', None)


def _apply_precision(cfg, s: Strategy) -> None:
    wrapper = cfg.get('optim_wrapper')
    if wrapper is None:
        if s.amp:
            raise UsageError(f'strategy {s.name!r} needs an optim_wrapper in the config')
        return
    type_name = wrapper.get('type', 'OptimWrapper')
    if type_name not in _OPTIM_WRAPPERS:
        if s.amp:
            raise UsageError(f'strategy {s.name!r} needs optim_wrapper.type OptimWrapper '
                             f'or AmpOptimWrapper, got {type_name}')
        return
    # dtype: AmpOptimWrapper's default (fp16 on CUDA); prepare_cfg picks bf16 on CPU
    wrapper.pop('dtype', None)
    if s.amp:
        wrapper['type'] = 'AmpOptimWrapper'
        wrapper['loss_scale'] = 'dynamic'
    else:
        if type_name != 'OptimWrapper':
            wrapper['type'] = 'OptimWrapper'
        wrapper.pop('loss_scale', None)


def apply_strategy(cfg, name: str):
    """Make ``cfg`` (an mmengine ``Config``, edited in place) train with
    strategy ``name``, whatever Mesa, loss, precision or checkpointing settings
    it had; returns ``cfg``.

    Backbone types map both ways (``SwinTransformer`` <-> ``MesaSwinTransformer``,
    ``PVT`` <-> ``MesaPVT``, ``PVTv2`` <-> ``MesaPVTv2``, ``MixVisionTransformer``
    <-> ``MesaMixVisionTransformer``, ``VisionTransformer`` <->
    ``MesaVisionTransformer``); a Mesa policy dict the
    config already has is kept for the Mesa strategies; ``mesa`` and
    ``fused_loss`` keys are dropped where the target class has none. Call it
    before :func:`mesa_seg.runner.prepare_cfg` (which turns fp16 AMP into bf16
    on machines without CUDA).

    Raises:
        UsageError: unknown strategy; a Mesa or ``sac`` strategy for a backbone
            without a Mesa twin; a fused-loss strategy for a segmentor other
            than (Mesa)EncoderDecoder; AMP with another optimizer wrapper.
    """
    s = get_strategy(name)
    model = cfg.get('model')
    if model is None:
        raise UsageError(f'strategy {name!r}: the config has no model')
    _apply_backbone(model, s)
    _apply_segmentor(model, s)
    _apply_precision(cfg, s)
    return cfg


def describe(name: str) -> Dict[str, str]:
    """What strategy ``name`` includes: ``description``, ``loss``,
    ``activations``, ``checkpointing``, ``precision`` (plain text)."""
    s = get_strategy(name)
    return dict(description=s.description, loss=s.loss, activations=s.activations,
                checkpointing=s.checkpointing_label, precision=s.precision)


def strategy_table(names: Optional[List[str]] = None) -> List[str]:
    """A markdown table of what each strategy includes (all by default)."""
    rows = ['| strategy | loss | activations | checkpointing | precision | in short |',
            '| --- | --- | --- | --- | --- | --- |']
    for name in names or list(STRATEGIES):
        d = describe(name)
        rows.append(f"| `{name}` | {d['loss']} | {d['activations']} | "
                    f"{d['checkpointing']} | {d['precision']} | {d['description']} |")
    return rows


def add_strategy_argument(parser: argparse.ArgumentParser, flag: str = '--strategy',
                          dest: Optional[str] = None, what: str = 'the config') -> None:
    """Add ``flag NAME`` (choices: :data:`STRATEGIES`) to ``parser``; its value
    is the strategy name or None. ``what`` names what it applies to in the help."""
    lines = '; '.join(f'{n}: {s.description}' for n, s in STRATEGIES.items())
    kwargs = dict(dest=dest) if dest else {}
    parser.add_argument(
        flag, choices=list(STRATEGIES), metavar='NAME', default=None, **kwargs,
        help=f'train {what} with this memory-saving strategy, whatever the config '
        f'sets (default: as the config is). Choices: {lines}')
