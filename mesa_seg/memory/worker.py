"""One measurement per fresh process: the parent side and the child side.

Parent: :func:`run_isolated` starts ``python -m mesa_seg.memory.worker SPEC OUT``
with :data:`~mesa_seg.memory.meters.MALLOC_ENV`, streams the child's output
into a log file, forwards its progress lines and returns the result it wrote.
Child: :func:`main` runs :func:`~mesa_seg.memory.measure.measure`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import deque
from dataclasses import asdict
from typing import Callable, Dict, Optional

from .meters import MALLOC_ENV

__all__ = ['run_isolated', 'MeasurementError']

_MARK = '@@mesa-memory-progress '


class MeasurementError(RuntimeError):
    """The measurement subprocess failed; the message ends with its log tail."""


def run_isolated(spec, log_path: Optional[str] = None,
                 on_progress: Callable[[str], None] = lambda phase: None,
                 timeout: Optional[float] = None) -> Dict:
    """Measure ``spec`` (:class:`~mesa_seg.memory.measure.RunSpec`) in a fresh
    Python process and return its result dict.

    Args:
        spec (RunSpec): what to measure.
        log_path (str, optional): where the child's output goes. Default: None
            (kept only for the error message).
        on_progress (callable): called with the phase name after each unit of
            work in the child. Default: no-op.
        timeout (float, optional): seconds before the child is killed.
            Default: None.

    Raises:
        MeasurementError: the child exited non-zero or wrote no result.
    """
    env = dict(os.environ, PYTHONUNBUFFERED='1', **MALLOC_ENV)
    with tempfile.TemporaryDirectory(prefix='mesa-memory-') as tmp:
        spec_path, out_path = os.path.join(tmp, 'spec.json'), os.path.join(tmp, 'result.json')
        with open(spec_path, 'w') as f:
            json.dump(asdict(spec), f)
        tail: deque = deque(maxlen=40)
        log = open(log_path, 'w') if log_path else None
        try:
            proc = subprocess.Popen(
                [sys.executable, '-m', 'mesa_seg.memory.worker', spec_path, out_path],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            for line in proc.stdout:
                if line.startswith(_MARK):
                    on_progress(line[len(_MARK):].strip())
                    continue
                tail.append(line)
                if log:
                    log.write(line)
            code = proc.wait(timeout=timeout)
        finally:
            if log:
                log.close()
        if code != 0 or not os.path.exists(out_path):
            where = f' (full log: {log_path})' if log_path else ''
            raise MeasurementError(
                f'measuring {spec.config} (batch {spec.batch}) failed with exit code '
                f'{code}{where}; last lines:\n' + ''.join(tail))
        with open(out_path) as f:
            return json.load(f)


def main(argv=None) -> int:
    import torch

    from ..mesa import get_backend
    from .measure import RunSpec, measure
    spec_path, out_path = (argv if argv is not None else sys.argv[1:])[:2]
    with open(spec_path) as f:
        spec = RunSpec(**json.load(f))

    def progress(phase: str) -> None:
        print(_MARK + phase, flush=True)

    result = measure(spec, progress)
    result.update(torch=torch.__version__, mesa_backend=get_backend())
    with open(out_path, 'w') as f:
        json.dump(result, f)
    return 0


if __name__ == '__main__':
    sys.exit(main())
