"""The options of one Mesa layer's activation quantizers, as one frozen object."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ['QuantizerConfig']


@dataclass(frozen=True)
class QuantizerConfig:
    """How a Mesa layer compresses the activations it saves for backward.

    Built by :meth:`MesaPolicy.quantizer_config` for each converted layer and
    passed whole to :meth:`MesaModule.from_float`, the Mesa module constructors
    (``mesa_config=``), :class:`ActivationQuantizer` and :class:`RunningRange`.
    The defaults are the paper's.

    Args:
        groups (int): quantization groups along the activation's channel/head
            axis, contiguous, each with its own range. Must divide that axis.
            Default: 1.
        momentum (float): weight of the old running-range estimate in its EMA
            update, in ``[0, 1)``. Default: 0.9.
        stochastic_rounding (bool): stochastic (unbiased) rounding;
            round-to-nearest otherwise. Default: True.
        sync_stats (bool): all-reduce the batch min/max over the default process
            group before updating, so every rank holds identical estimates. Off
            by default: estimates only shape the rounding grid of each rank's own
            saved activations, and syncing costs two collectives per layer per
            step. Default: False.
        widen_to_batch (bool): quantize each batch with the running range widened
            to cover the batch's min/max, so nothing saturates (the estimates stay
            the plain EMA). False is the paper's running range, where outliers
            saturate. Default: False.
    """
    groups: int = 1
    momentum: float = 0.9
    stochastic_rounding: bool = True
    sync_stats: bool = False
    widen_to_batch: bool = False

    def __post_init__(self):
        if not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f'groups must be a positive int, got {self.groups!r}')
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f'momentum must be in [0, 1), got {self.momentum!r}')
