"""Measured fixes that let mmsegmentation 1.2.2 run on the pinned stack.

The stack is mmcv-lite 2.1.0 (no compiled ``mmcv.ops``), torch >= 2.6 (whose
``torch.load`` defaults to ``weights_only=True``), mmengine 0.10.7 and, on
machines without a GPU, CPU training. :func:`apply` runs the import-time fixes;
it must run before mmseg is imported, so ``import mesa_seg.models`` and
:func:`mesa_seg.register_all_modules` (which ``custom_imports=dict(imports=
['mesa_seg.register'])`` in a config runs, for mmseg's own ``tools/train.py``
as well) call it first. Importing this module changes nothing. The CPU launch
fixes are helpers, called by our ``tools/train.py`` and ``tools/test.py``
(through :func:`mesa_seg.runner.prepare_cfg`):

- :func:`apply`: mmcv.ops stand-in, checkpoint allowlist, registers
  :class:`CPUAmpOptimWrapper` (bf16 AMP on CPU).
- :func:`setup_cpu_distributed`: gloo process group and ``device_ids=None``.
- :func:`sync_bn_cfg_to_bn`: SyncBN -> BN in a model *config* (built
  modules: :func:`mesa_seg.models.segmentors.convert_sync_bn_to_bn2d`).
"""
import datetime
import importlib.util
import os
import pickle
import subprocess
import sys
import types
import warnings
from contextlib import contextmanager
from typing import Any

import torch
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS

__all__ = [
    'apply', 'MmcvOpsUnavailableError', 'CPUAmpOptimWrapper',
    'setup_cpu_distributed', 'sync_bn_cfg_to_bn'
]

# Names imported from ``mmcv.ops`` at import time of ``mmseg.models`` (and of
# everything it pulls in from mmcv/mmengine) OUTSIDE a try/except. Found by
# grepping mmseg 1.2.2, mmcv-lite 2.1.0 and mmengine 0.10.7 site-packages.
_HARD_IMPORTED_OPS = ('point_sample', 'sigmoid_focal_loss')

_FULL_MMCV_HINT = (
    'mmcv-lite is installed, which has no compiled ops (mmcv._ext). '
    'Install full mmcv for this op: pip uninstall -y mmcv-lite && '
    'pip install -U openmim && mim install "mmcv==2.1.0".')

_applied = False


class MmcvOpsUnavailableError(RuntimeError):
    """Raised when a stand-in for a compiled ``mmcv.ops`` op is used."""


def _ops_stand_in(name: str):

    def stand_in(*args, **kwargs):
        raise MmcvOpsUnavailableError(
            f'mmcv.ops.{name} is not available: {_FULL_MMCV_HINT}')

    stand_in.__name__ = stand_in.__qualname__ = name
    stand_in.__doc__ = f'Stand-in for mmcv.ops.{name} (mmcv-lite).'
    return stand_in


def _ops_getattr(name: str) -> Any:
    # Other names raise ModuleNotFoundError, exactly what they raised before
    # the stand-in existed, so mmseg's own ``try: from mmcv.ops import X /
    # except ModuleNotFoundError`` fallbacks (CCHead, PSAHead, PointHead,
    # mmcv's collect_env) keep working. Dunders stay AttributeError for
    # hasattr()/import machinery.
    if name.startswith('__'):
        raise AttributeError(name)
    raise ModuleNotFoundError(
        f'mmcv.ops.{name} is not available: {_FULL_MMCV_HINT}',
        name='mmcv._ext')


def _install_mmcv_ops_stand_in() -> None:
    if 'mmcv.ops' in sys.modules or importlib.util.find_spec('mmcv') is None:
        return
    if importlib.util.find_spec('mmcv._ext') is not None:
        return  # full mmcv: the real ops import fine.
    import mmcv

    # mmseg 1.2.2 hard-imports mmcv.ops (e.g. mmseg/utils/mask_classification
    # .py), and mmcv-lite's mmcv/ops/__init__.py fails on the missing
    # mmcv._ext, so ``import mmseg.models`` dies. A plain module exporting
    # only the hard-imported names makes the imports succeed; using one
    # raises MmcvOpsUnavailableError with the install hint.
    ops = types.ModuleType('mmcv.ops', 'mmcv-lite stand-in (mesa_seg.compat)')
    for name in _HARD_IMPORTED_OPS:
        setattr(ops, name, _ops_stand_in(name))
    ops.__all__ = list(_HARD_IMPORTED_OPS)
    ops.__getattr__ = _ops_getattr
    sys.modules['mmcv.ops'] = ops
    mmcv.ops = ops
    # mmcv warns on every import that MultiScaleDeformableAttention is
    # missing; the stand-in reports that (with the fix) if it is ever used.
    warnings.filterwarnings(
        'ignore', message='Fail to import ``MultiScaleDeformableAttention``')


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """``getattr`` for unpickling, limited to HistoryBuffer's methods.

    Under pickle protocol 2 the statistics methods that mmengine's
    ``HistoryBuffer.__getstate__`` stores are written as
    ``getattr(HistoryBuffer, 'min')``; a general getattr is not safe to allow.
    """
    from mmengine.logging import HistoryBuffer
    if obj is HistoryBuffer and not name.startswith('_') and callable(
            getattr(HistoryBuffer, name, None)):
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'checkpoint asks for getattr({obj!r}, {name!r}); only '
        'HistoryBuffer methods are allowed')


def _checkpoint_safe_globals() -> list:
    """The globals found in mmengine 0.10.7 checkpoints beyond torch's
    defaults (listed with pickletools from a saved iter_N.pth)."""
    import numpy as np
    from mmengine.logging import HistoryBuffer
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar
    dtype_classes = [type(np.dtype(t)) for t in set(np.sctypeDict.values())]
    return [
        HistoryBuffer, np.ndarray, np.dtype, _reconstruct, scalar,
        *dtype_classes,
        (_history_buffer_getattr, '__builtin__.getattr'),
        (_history_buffer_getattr, 'builtins.getattr'),
    ]


def _allow_mmengine_checkpoint_types() -> None:
    # torch >= 2.6 loads with weights_only=True; mmengine 0.10.7 calls
    # torch.load without weights_only, and its checkpoints pickle the
    # message hub (HistoryBuffer, numpy arrays/scalars/dtypes), so resume
    # fails. Allowlisting exactly these trusted types keeps the safe loader
    # on for everything else, and no environment variable is needed.
    if hasattr(torch.serialization, 'add_safe_globals'):
        torch.serialization.add_safe_globals(_checkpoint_safe_globals())


class CPUAmpOptimWrapper(OptimWrapper):
    """Mixed precision on CPU: bf16 autocast, no loss scaling.

    mmengine's ``AmpOptimWrapper`` asserts a GPU; ``tools/train.py --amp``
    picks this wrapper when there is none. bf16 keeps fp32's exponent range,
    so gradients need no scaling.

    Args:
        dtype (str): Autocast dtype; only ``'bfloat16'`` runs on CPU.
            Default: 'bfloat16'.
        **kwargs: Passed to :class:`mmengine.optim.OptimWrapper`.
    """

    def __init__(self, dtype: str = 'bfloat16', **kwargs):
        if dtype not in ('bfloat16', torch.bfloat16):
            raise ValueError('CPUAmpOptimWrapper supports dtype bfloat16 '
                             f'only, got {dtype!r}')
        super().__init__(**kwargs)
        self.cast_dtype = torch.bfloat16

    @contextmanager
    def optim_context(self, model):
        with super().optim_context(model), torch.autocast(
                'cpu', dtype=self.cast_dtype):
            yield


def apply() -> None:
    """Apply the import-time fixes (idempotent).

    Must run before ``mmseg.models`` is imported for the first time.
    """
    global _applied
    if _applied:
        return
    _install_mmcv_ops_stand_in()
    _allow_mmengine_checkpoint_types()
    if 'CPUAmpOptimWrapper' not in OPTIM_WRAPPERS.module_dict:
        OPTIM_WRAPPERS.register_module(module=CPUAmpOptimWrapper)
    _applied = True


def _slurm_to_torchrun_env(environ) -> dict:
    """Translate SLURM's variables to the ones ``env://`` init reads."""
    env = dict(
        RANK=environ['SLURM_PROCID'],
        WORLD_SIZE=environ['SLURM_NTASKS'],
        LOCAL_RANK=environ.get('SLURM_LOCALID', '0'),
        MASTER_PORT=environ.get('MASTER_PORT', '29500'))
    if 'MASTER_ADDR' in environ:
        env['MASTER_ADDR'] = environ['MASTER_ADDR']
    else:
        env['MASTER_ADDR'] = subprocess.getoutput(
            f'scontrol show hostname {environ["SLURM_NODELIST"]} | head -n1')
    return env


def setup_cpu_distributed(cfg, launcher: str) -> bool:
    """Initialise CPU (gloo) distributed training before the Runner does.

    mmengine's launchers call ``torch.cuda.set_device`` and its default DDP
    wrapper passes ``device_ids=[LOCAL_RANK]``; both fail without CUDA. Here
    the gloo process group is initialised from the launcher's environment,
    with ``env_cfg.dist_cfg.timeout`` (seconds) as its timeout (the Runner
    then skips its own init), and ``cfg.model_wrapper_cfg`` gets
    ``device_ids=None``. With CUDA, or ``launcher='none'``, it does nothing
    and mmengine uses the config's backend (nccl) as in mmseg.

    Args:
        cfg (mmengine.Config): The config, updated in place.
        launcher (str): 'none', 'pytorch' or 'slurm'.

    Returns:
        bool: Whether the CPU process group was set up here.
    """
    if launcher == 'none' or torch.cuda.is_available():
        return False
    import torch.distributed as dist

    if launcher == 'slurm':
        os.environ.update(_slurm_to_torchrun_env(os.environ))
    elif launcher != 'pytorch':
        raise ValueError(
            f'launcher {launcher!r} is not supported without CUDA; use '
            "'pytorch' (tools/dist_train.sh) or 'slurm'")
    missing = [k for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')
               if k not in os.environ]
    if missing:
        raise RuntimeError(
            f'--launcher {launcher} needs the variables set by its launcher '
            f'(missing: {", ".join(missing)}); start with tools/dist_train.sh '
            'CONFIG NPROC (torchrun) instead')
    if not dist.is_initialized():
        # the config's timeout bounds how long a collective waits for a rank
        # that stopped answering (mmengine's init_dist reads it the same way)
        timeout = ((cfg.get('env_cfg') or {}).get('dist_cfg') or {}).get(
            'timeout')
        kwargs = {} if timeout is None else dict(
            timeout=datetime.timedelta(seconds=timeout))
        dist.init_process_group(backend='gloo', **kwargs)
    wrapper = dict(
        type='MMDistributedDataParallel',
        broadcast_buffers=False,
        find_unused_parameters=cfg.get('find_unused_parameters', False))
    wrapper.update(cfg.get('model_wrapper_cfg') or {})
    wrapper['device_ids'] = None
    cfg.model_wrapper_cfg = wrapper
    return True


def sync_bn_cfg_to_bn(node: Any) -> Any:
    """Replace ``type='SyncBN'`` by ``'BN'`` in a (nested) model config.

    ``nn.SyncBatchNorm`` needs CUDA tensors once a process group exists
    (CPU DDP raises), so CPU runs train with plain BN. mmengine already
    reverts SyncBN in non-distributed runs; configs keep SyncBN for GPUs.

    Args:
        node (dict | list | Any): Config node, modified in place.

    Returns:
        The same node.
    """
    if isinstance(node, dict):
        if node.get('type') == 'SyncBN':
            node['type'] = 'BN'
        for value in node.values():
            sync_bn_cfg_to_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            sync_bn_cfg_to_bn(value)
    return node
