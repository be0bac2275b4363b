"""A data file that goes bad during a run names itself.

:mod:`mesa_seg.preflight` checks every file before training. A file deleted,
truncated or overwritten afterwards fails inside the loading transforms,
often without its path (mmseg's ``LoadAnnotations`` on garbage:
``'NoneType' object has no attribute 'squeeze'``), and in a dataloader
worker as a multi-line traceback. :func:`install` (run by
:func:`mesa_seg.register_all_modules`, before any dataloader forks its
workers) wraps mmengine's ``BaseDataset.prepare_data``: when loading a sample
raises, the sample's files are checked again; if one is missing or does not
decode, :class:`~mesa_seg.errors.DataFileError` names it. Any other error
propagates unchanged. :func:`data_file_message` recovers the one-line message
from the copy a worker's exception becomes in the main process.
"""
from __future__ import annotations

import os.path as osp
from typing import Iterable, Optional

from .errors import DataFileError

__all__ = ['install', 'file_problem', 'data_file_message']

_installed = False
_MARK = 'DataFileError: '


def file_problem(paths: Iterable[Optional[str]]) -> Optional[str]:
    """What is wrong with the first bad file of ``paths`` (missing, or does
    not decode completely), or None if all are readable."""
    from PIL import Image
    for path in paths:
        if not path:
            continue
        if not osp.isfile(path):
            return f'{path} is missing'
        try:
            with Image.open(path) as img:
                img.load()
        except Exception as e:  # noqa: BLE001 - any decoding failure
            return f'{path} does not decode ({type(e).__name__}: ' \
                f'{str(e).splitlines()[0] if str(e) else ""})'
    return None


def install() -> None:
    """Wrap ``mmengine.dataset.BaseDataset.prepare_data`` (idempotent)."""
    global _installed
    if _installed:
        return
    from mmengine.dataset import BaseDataset
    prepare_data = BaseDataset.prepare_data

    def checked_prepare_data(self, idx):
        try:
            return prepare_data(self, idx)
        except Exception as e:
            try:
                info = self.get_data_info(idx)
            except Exception:  # noqa: BLE001 - report the original error
                raise e from None
            problem = file_problem(
                info.get(k) for k in ('img_path', 'seg_map_path'))
            if problem is None:
                raise
            raise DataFileError(
                f'data file {problem} (sample {idx} of '
                f'{type(self).__name__}; {type(e).__name__} while loading: '
                f'{_first_line(e)})') from e

    checked_prepare_data.__wrapped__ = prepare_data
    checked_prepare_data.__doc__ = prepare_data.__doc__
    BaseDataset.prepare_data = checked_prepare_data
    _installed = True


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ''


def data_file_message(error: DataFileError) -> str:
    """The one-line message of ``error``, also when a dataloader worker
    raised it (the main process then gets a copy whose message is the
    worker's whole traceback, the original line last)."""
    text = str(error).strip()
    if 'Traceback' not in text:
        return text
    for line in reversed(text.splitlines()):
        if _MARK in line:
            return line.split(_MARK, 1)[1].strip()
    return text.splitlines()[0]
