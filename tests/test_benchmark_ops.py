"""Smoke test of the op benchmark (``python -m mesa_seg.benchmark.ops``)."""
import pytest

import mesa_seg.mesa as mesa
from mesa_seg.benchmark import ops as bench
from mesa_utils import eager_by_default  # noqa: F401  (fixture)


def test_small_benchmark_prints_every_op(capsys):
    with mesa.use_backend('compile'):
        rows = bench.main(['--shapes', 'small', '--repeat', '1', '--backend', 'eager'])
        assert mesa.get_backend() == 'compile'  # --backend holds for the run only
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0].startswith('Mesa op benchmark: shapes=small, backend=eager')
    for name in bench.OPS:
        assert any(line.split()[0] == name for line in lines[1:] if line.strip()), name
    assert [r['op'] for r in rows] == list(bench.OPS)
    for r in rows:
        ratio = r['mesa_bytes'] / r['torch_bytes']
        assert ratio < (0.04 if r['op'] == 'relu' else 0.3), r
        assert min(r[k] for k in ('torch_fwd', 'torch_bwd', 'mesa_fwd', 'mesa_bwd')) > 0


def test_arguments_are_validated():
    with pytest.raises(SystemExit):
        bench.parse_args(['--shapes', 'swin_b'])
    with pytest.raises(SystemExit):
        bench.parse_args(['--repeat', '0'])
    assert bench.parse_args([]).shapes == 'swin_t_512'
