"""tools/interleaved_time.py: step-time ratios with the strategies' steps interleaved."""
import json
import os.path as osp
import subprocess
import sys

import pytest

from mesa_seg.benchmark import interleaved

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY = osp.join(REPO, 'tests', 'data', 'tiny_upernet_swin.py')


def test_rounds_alternate_order_and_ratios_are_per_round(monkeypatch):
    # Fake models: the step time of each strategy comes from a script, so the
    # order of the steps and the ratios can be checked exactly.
    order, clock = [], [0.0]
    durations = {'fp32': [1.0, 2.0, 4.0], 'mesa': [3.0, 5.0, 2.0]}

    class Model:
        def __init__(self, name):
            self.name = name

        def train_step(self, data, optim_wrapper):
            order.append(self.name)
            steps = order.count(self.name)
            if steps > 1:  # the first step is the untimed warm-up
                clock[0] += durations[self.name][steps - 2]

    monkeypatch.setattr(interleaved, '_build',
                        lambda config, name, *a: (Model(name), None, None))
    monkeypatch.setattr(interleaved.time, 'perf_counter', lambda: clock[0])
    result = interleaved.time_interleaved('cfg.py', ['fp32', 'mesa'], (8, 8), rounds=3)
    a, b = 'fp32', 'mesa'
    assert order == [a, b, a, b, b, a, a, b]
    assert result['wall'] == durations
    # per-round ratios 3, 2.5, 0.5: their median (not the ratio of medians, 1.5)
    assert result['wall_ratio'] == {a: 1.0, b: 2.5}
    assert result['rounds'] == 3 and result['strategies'] == [a, b]


@pytest.mark.parametrize('strategies, match', [
    (['mesa'], 'two or more'), (['mesa', 'mesa'], 'distinct'), (['fp32', 'nope'], 'unknown')])
def test_bad_strategies_are_clear_errors(strategies, match):
    with pytest.raises(ValueError, match=match):
        interleaved.time_interleaved('cfg.py', strategies, (8, 8))


@pytest.mark.slow
def test_interleaved_time_end_to_end(tmp_path):
    out = str(tmp_path / 'times.json')
    run = subprocess.run(
        [sys.executable, osp.join(REPO, 'tools', 'interleaved_time.py'), '--model', TINY,
         '--strategies', 'fused_loss', 'mesa', '--size', '64', '64', '--rounds', '2',
         '--threads', '1', '--out', out],
        capture_output=True, text=True, cwd=REPO, timeout=900,
        env=dict(__import__('os').environ, MESA_BACKEND='eager'))
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.load(open(out))
    assert result['wall_ratio']['fused_loss'] == 1.0
    assert len(result['wall']['mesa']) == len(result['cpu']['mesa']) == 2
    assert all(t > 0 for t in result['wall']['mesa'] + result['cpu']['mesa'])
    assert '| `mesa` |' in run.stdout and 'interleaved rounds' in run.stdout
