"""The dials. `--depth D`: one dial for the size of a new model; explicit settings win, the shape cannot be set
twice, a resume keeps what the checkpoint recorded. `--time-budget T` plans the steps from the speed as it goes.
Every mistake is one `error:` line with nothing written."""
from __future__ import annotations

import math

import pytest

from conftest import (assert_clean_error, assert_decay_reached_floor, cli_run, events, read_jsonl, run_cli, segments,
                      tiny_args)

CHEAP = ('--set', 'eval_batches=1', '--set', 'eval_cadence=0', '--set', 'sample_length=0', '--set', 'block_size=16',
         '--set', 'log_cadence=1', '--set', 'device=cpu', '--set', 'threads=1')


def test_depth_sets_the_shape_batch_rates_and_steps(corpus, tmp_path):
    out = tmp_path / 'd2'
    p = run_cli(['--data', corpus, '--out-dir', out, '--depth', 2, '--max-steps', 3, *CHEAP])
    assert p.returncode == 0, p.stderr[-2000:]
    cfg = events(read_jsonl(out / 'train.jsonl'), 'run_start')[0]['config']   # the depth and every derived value
    batch = round(12 * (2 / 4) ** 0.383)
    assert (cfg['depth'], cfg['n_layer'], cfg['n_head'], cfg['n_embd'], cfg['batch_size']) == (2, 2, 2, 128, batch)
    assert cfg['learning_rate'] == pytest.approx(1e-3 * math.sqrt(batch / 12))   # width 128: AdamW's factor is 1
    assert (cfg['max_steps'], cfg['lr_decay_steps']) == (3, 3)                      # an explicit --max-steps wins
    # a resume without --depth continues with what the checkpoint recorded
    p = run_cli(['--resume', out, '--max-steps', 5])
    assert p.returncode == 0, p.stderr[-2000:]
    again = segments(read_jsonl(out / 'train.jsonl'))[1][0]['config']
    assert {k: again[k] for k in cfg if k != 'max_steps'} == {k: cfg[k] for k in cfg if k != 'max_steps'}


def test_depth_12_is_gpt2_small_and_the_yaml_can_hold_it(tmp_path):
    from tinylm.config import load_config
    from tinylm.optim import apply_dials
    (tmp_path / 'd12.yaml').write_text('depth: 12\ntokens_per_param: 20\n', encoding='utf-8')
    c = apply_dials(load_config(tmp_path / 'd12.yaml'))
    assert (c.n_layer, c.n_head, c.n_embd) == (12, 12, 768)
    assert c.max_steps == math.ceil(20 * 12 * 12 * 768 ** 2 / (c.batch_size * c.block_size))


@pytest.mark.parametrize('args, msg', [
    (['--depth', 6, '--set', 'n_layer=4'], 'depth 6 sets n_layer=6, and n_layer=4 is set too'),
    (['--depth', 0], 'depth must be at least 1'),
    (['--depth', -3], 'depth must be at least 1'),
    (['--set', 'depth=2', '--set', 'tokens_per_param=0'], 'tokens_per_param must be > 0'),
    (['--depth', 'two'], "argument --depth: expects a whole number or auto, got 'two'"),
    (['--depth', 'auto'], '--depth auto needs --time-budget'),
    (['--depth', 'auto', '--time-budget', '10m', '--set', 'n_embd=96'], 'depth 1 sets n_embd=64, and n_embd=96'),
], ids=['shape-twice', 'zero', 'negative', 'no-tokens', 'not-a-number', 'auto-without-budget', 'auto-shape-twice'])
def test_bad_depth_is_one_error_line_and_nothing_is_written(corpus, tmp_path, args, msg):
    out = tmp_path / 'never'
    p = run_cli(['--data', corpus, '--out-dir', out, *args, *CHEAP])
    assert_clean_error(p.returncode, p.stdout, p.stderr, code=2 if 'argument --depth' in msg else 1, contains=msg)
    assert not out.exists()


def test_depth_with_init_from_is_refused(corpus, tmp_path):
    src = cli_run(tmp_path / 'src', corpus, 2)
    out = tmp_path / 'tuned'
    p = run_cli(['--init-from', src.out, '--data', corpus, '--out-dir', out, '--depth', 2, '--set', 'device=cpu'])
    assert_clean_error(p.returncode, p.stdout, p.stderr,
                       contains=('its model has depth=0, but depth=2 is set on the command line', 'drop the setting'))
    assert not out.exists()


# ---------------------------------------------------------------- --time-budget
BUDGET = ('--set', 'eval_cadence=0', '--set', 'sample_length=0', '--set', 'checkpoint_cadence=20',
          '--set', 'keep_checkpoints=1000', '--set', 'log_cadence=1')


def test_time_budget_plans_as_it_goes_and_a_resume_keeps_its_decisions(corpus, tmp_path):
    out = tmp_path / 'straight'                          # no --max-steps: the budget decides
    p = run_cli(['--data', corpus, '--out-dir', out, '--time-budget', '2s', *tiny_args(), *BUDGET])
    assert p.returncode == 0, p.stderr[-2000:]
    recs = read_jsonl(out / 'train.jsonl')
    start = events(recs, 'run_start')[0]
    assert start['config']['time_budget'] == '2s' and start['config']['lr_decay_steps'] == 10**9
    decided = events(recs, 'time_budget')
    first = decided[0]
    assert (first['step'], first['phase'], first['probe_steps']) == (10, 'stable', 10)
    assert first['steps'] > 20, first                   # a tiny model does hundreds of steps in 2 s
    decays = [d for d in decided if d['phase'] == 'decay']
    assert decays and all(d['step'] > first['step'] for d in decays)
    steps = [r for r in recs if r['event'] == 'step']
    assert steps[-1]['step'] == decays[-1]['steps']
    assert_decay_reached_floor(steps[-1]['lr'], start['config'])
    trained = sum(r['step_time_s'] for r in steps)
    assert 1.5 < trained < 2.5, trained                 # the budget holds (tightly: tests/test_time_budget.py)
    import torch
    ck = torch.load(out / 'checkpoints' / 'step_000020.pt', weights_only=True)
    assert ck['time_budget']['phase'] == 'stable' and ck['train_seconds'] > 0
    # a resume from step 20 follows every decision made before it, bit for bit, until either run decides anew
    p = run_cli(['--resume', out / 'checkpoints' / 'step_000020.pt', '--out-dir', tmp_path / 'resumed'])
    assert p.returncode == 0, p.stderr[-2000:]
    again = read_jsonl(tmp_path / 'resumed' / 'train.jsonl')
    next_decision = min([d['step'] for d in decided + events(again, 'time_budget') if d['step'] > 20] + [10**9])
    resumed = {r['step']: r['loss'] for r in again if r['event'] == 'step' and r['step'] <= next_decision}
    assert resumed and resumed == {r['step']: r['loss'] for r in steps if 20 < r['step'] <= next_decision}


def test_an_explicit_max_steps_caps_the_budget(corpus, tmp_path):
    run = cli_run(tmp_path / 'cap', corpus, 15, '--time-budget', '1h', *BUDGET)
    assert events(run.records, 'time_budget')[0]['steps'] == 15
    assert [r for r in run.records if r['event'] == 'step'][-1]['step'] == 15


@pytest.mark.parametrize('budget, msg', [('10', 'a number with a unit, s, m or h'), ('0s', 'more than 0 seconds'),
                                         ('ten minutes', 'a number with a unit'),
                                         ('0.00001s', 'cannot fit one training step: a step of this model takes')])
def test_a_bad_budget_is_one_error_line_and_nothing_is_written(corpus, tmp_path, budget, msg):
    out = tmp_path / 'never'
    p = run_cli(['--data', corpus, '--out-dir', out, '--time-budget', budget, *CHEAP])
    assert_clean_error(p.returncode, p.stdout, p.stderr, contains=msg)
    assert not out.exists()


def test_depth_auto_picks_the_depth_the_law_calls_best_and_records_why(corpus, tmp_path):
    import json
    from tinylm.device import LAW_FILE
    out = tmp_path / 'auto'
    p = run_cli(['--data', corpus, '--out-dir', out, '--config', 'modern', '--depth', 'auto', '--time-budget', '1m',
                 '--max-steps', 3, *CHEAP])
    assert p.returncode == 0, p.stderr[-2000:]
    start = events(read_jsonl(out / 'train.jsonl'), 'run_start')[0]
    probe = start['budget_probe']                              # what was timed, and the law it was read against
    assert probe['law'] == json.loads(LAW_FILE.read_text())
    rows = probe['rows']
    assert [r['depth'] for r in rows] == list(range(1, len(rows) + 1))
    assert all(r['law_params'] > r['params'] for r in rows[:-1])       # it stops at the first depth past the law
    best = min(rows, key=lambda r: abs(math.log(r['params'] / r['law_params'])))
    recipe = probe['recipe']                                   # the recipe's own shape, timed like a depth
    assert recipe['depth'] is None and recipe['params'] == 12 * 4 * 128 ** 2
    distance = lambda r: abs(math.log(r['params'] / r['law_params']))
    keeps_recipe = distance(recipe) <= distance(best) + math.log(2)
    assert probe['depth'] == (None if keeps_recipe else best['depth'])
    assert start['config']['depth'] == (probe['depth'] or 0) and start['n_params'] != 0
    assert start['config']['n_layer'] == (4 if keeps_recipe else best['depth'])
    picked = "the recipe's own shape" if keeps_recipe else f"depth {best['depth']}"
    assert f"depth auto: {picked} (timed the recipe's shape and depths 1..{len(rows)}" in p.stdout
