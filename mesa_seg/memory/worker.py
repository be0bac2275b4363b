"""One measurement per fresh process: the parent side and the child side.

Parent: :func:`run_isolated` starts ``python -m mesa_seg.memory.worker SPEC OUT``
(glibc's default allocator settings, as in training), streams the child's output
into a log file, forwards its progress lines and returns the result it wrote.
Child: :func:`main` runs :func:`~mesa_seg.memory.measure.measure`.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections import deque
from dataclasses import asdict
from typing import Callable, Dict, Optional


__all__ = ['run_isolated', 'MeasurementError', 'error_line']

_MARK = '@@mesa-memory-progress '


class MeasurementError(RuntimeError):
    """The measurement subprocess failed; the message ends with its log tail.

    Attributes:
        last_line (str): one line saying what went wrong: the exception line of
            the child's traceback, or how it ended (timeout, killed by a signal).
    """

    def __init__(self, message: str, last_line: str = ''):
        super().__init__(message)
        self.last_line = last_line or message.strip().splitlines()[-1]


_EXCEPTION_LINE = re.compile(r'^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b)(:|$)')


def error_line(lines) -> str:
    """The exception line of a traceback in ``lines`` (the last one), else the
    last non-empty line."""
    lines = [line.rstrip() for line in lines if line.strip()]
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line):
            return line
    return lines[-1] if lines else ''


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
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    with tempfile.TemporaryDirectory(prefix='mesa-memory-') as tmp:
        spec_path, out_path = os.path.join(tmp, 'spec.json'), os.path.join(tmp, 'result.json')
        with open(spec_path, 'w') as f:
            json.dump(asdict(spec), f)
        tail: deque = deque(maxlen=40)
        log = open(log_path, 'w') if log_path else None
        timed_out = threading.Event()
        proc = timer = None
        try:
            proc = subprocess.Popen(
                [sys.executable, '-m', 'mesa_seg.memory.worker', spec_path, out_path],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            if timeout:
                # The child's output is read until it closes: only a kill ends a
                # hung child, so the timer kills it.
                def kill():
                    timed_out.set()
                    proc.kill()
                timer = threading.Timer(timeout, kill)
                timer.daemon = True
                timer.start()
            for line in proc.stdout:
                if line.startswith(_MARK):
                    on_progress(line[len(_MARK):].strip())
                    continue
                tail.append(line)
                if log:
                    log.write(line)
                    log.flush()
            code = proc.wait()
        finally:
            if timer is not None:
                timer.cancel()
            if proc is not None and proc.poll() is None:  # interrupted: no orphan
                proc.kill()
                proc.wait()
            if log:
                log.close()
        if code != 0 or not os.path.exists(out_path):
            where = f' (full log: {log_path})' if log_path else ''
            if timed_out.is_set():
                last = f'timed out after {timeout:g} s (killed)'
            elif code < 0:
                name = signal.Signals(-code).name if -code in signal.valid_signals() \
                    else str(-code)
                hint = ' (out of memory?)' if -code == signal.SIGKILL else ''
                last = f'killed by {name}{hint}; before that: {error_line(tail)}'
            else:
                last = error_line(tail) or f'exit code {code}, no output'
            raise MeasurementError(
                f'measuring {spec.config} (batch {spec.batch}) failed with exit code '
                f'{code}{where}: {last}; last lines:\n' + ''.join(tail), last)
        with open(out_path) as f:
            return json.load(f)


def main(argv=None) -> int:
    import torch

    from ..mesa import compile_failed, get_backend
    from .measure import RunSpec, measure
    spec_path, out_path = (argv if argv is not None else sys.argv[1:])[:2]
    with open(spec_path) as f:
        spec = RunSpec(**json.load(f))

    def progress(phase: str) -> None:
        print(_MARK + phase, flush=True)

    result = measure(spec, progress)
    result.update(torch=torch.__version__, mesa_backend=get_backend(),
                  mesa_compile_failed=compile_failed())
    with open(out_path, 'w') as f:
        json.dump(result, f)
    return 0


if __name__ == '__main__':
    sys.exit(main())
