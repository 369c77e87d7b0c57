"""A time budget holds when the speed changes under it: steps that slow by 30% half-way through the budget still end
within 5% of it, because the plan is re-aimed at the clock as the run goes (nbs/13_dials.ipynb)."""
import os

import pytest

from conftest import assert_decay_reached_floor, events, read_jsonl, run_cli, tiny_args

pytestmark = pytest.mark.slow   # seconds of real training, timed

DRIFT = '''
import time
class Drift:
    "Each step takes 20 ms longer until half of the budget is spent, then 26 ms: 30% slower, as a busy machine gets."
    def before_step(self, t):
        time.sleep(0.020 if t.train_seconds < 2.0 else 0.026)
'''


def test_a_budget_holds_within_five_percent_when_the_steps_slow_by_thirty_percent(corpus, tmp_path, monkeypatch):
    (tmp_path / 'drift.py').write_text(DRIFT)
    monkeypatch.setenv('PYTHONPATH', f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = tmp_path / 'run'
    p = run_cli(['--data', corpus, '--out-dir', out, '--time-budget', '4s', '--hook', 'drift:Drift',
                 *tiny_args(eval_cadence=0, sampling_cadence=0, checkpoint_cadence=0, log_cadence=1)])
    assert p.returncode == 0, p.stderr[-2000:]
    recs = read_jsonl(out / 'train.jsonl')
    steps = [r for r in recs if r['event'] == 'step']
    trained = sum(r['step_time_s'] for r in steps)
    assert abs(trained - 4.0) <= 0.05 * 4.0, trained
    decided = events(recs, 'time_budget')
    slow = [d for d in decided if d['step_s'] > 0.025]
    assert slow, decided                                   # the plan saw the slower steps and re-aimed at them
    assert_decay_reached_floor(steps[-1]['lr'], recs[0]['config'])
