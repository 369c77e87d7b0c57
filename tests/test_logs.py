"""train.jsonl is complete: every event and field present, typed and parseable; floats exact; resumed runs append."""
from __future__ import annotations
import datetime, json, math, re, subprocess
from pathlib import Path

import torch

import tinylm
from conftest import REF_STEPS, SHORT_STEPS, TINY, cli_run, events, segments

from tinylm.config import TrainingConfig, config_hash
from tinylm.model import Transformer
from tinylm.optim import lr_at

EVENT_NAMES = {'run_start', 'step', 'eval', 'sample', 'checkpoint', 'run_end'}
CLI_HOOKS = {'GracefulStop', 'Evaluator', 'Sampler', 'Checkpointer', 'ConsoleLogger', 'JsonlLogger'}


def is_float(v): return isinstance(v, float) and math.isfinite(v)


REPO = Path(__file__).resolve().parent.parent


def expected_git_commit():
    "HEAD of this checkout when tinylm is imported from it (an editable install, as in CI); None for a package."
    if Path(tinylm.__file__).resolve().parent != REPO / 'tinylm': return None
    return subprocess.run(['git', '-C', str(REPO), 'rev-parse', 'HEAD'], capture_output=True, text=True,
                          check=True).stdout.strip()


def check_common(records):
    "Fields every record carries."
    assert records, "empty log"
    last_ts = None
    for r in records:
        assert r['event'] in EVENT_NAMES, r
        ts = datetime.datetime.fromisoformat(r['ts'])
        assert ts.tzinfo is not None and ts.utcoffset() == datetime.timedelta(0), r['ts']
        assert last_ts is None or ts >= last_ts, "timestamps go backwards"
        last_ts = ts
        assert isinstance(r['run_id'], str) and r['run_id']
        assert isinstance(r['step'], int) and not isinstance(r['step'], bool) and r['step'] >= 0
    assert len({r['run_id'] for r in records}) == 1, "one run, one run_id"


def check_run_start(r, config: TrainingConfig, corpus: Path, resumed_from):
    assert r['event'] == 'run_start'
    assert r['config'] == config.to_dict()
    assert r['config_hash'] == config_hash(TrainingConfig.from_dict(r['config']))
    assert isinstance(r['config_hash'], str) and len(r['config_hash']) >= 8
    gc = r['git_commit']
    assert gc is None or (isinstance(gc, str) and re.fullmatch(r'[0-9a-f]{40}', gc)), gc
    assert gc == expected_git_commit()
    assert r['tinylm_version'] == tinylm.__version__
    assert isinstance(r['hooks'], list) and all(isinstance(h, str) for h in r['hooks'])
    assert set(r['hooks']) == CLI_HOOKS
    assert r['resumed_from'] == (None if resumed_from is None else str(resumed_from))
    vocab = len(set(corpus.read_text(encoding='utf-8')))
    assert r['vocab_size'] == vocab
    model = Transformer(vocab, config)
    assert r['n_params'] == sum(p.numel() for p in model.parameters()) > 0
    assert r['device'] == 'cpu' and r['torch_version'] == torch.__version__


def check_events(records, config: TrainingConfig, first_step: int, last_step: int, status='completed'):
    "The events of one run segment from step first_step to last_step."
    steps = events(records, 'step')
    assert [s['step'] for s in steps] == list(range(first_step, last_step + 1))
    for s in steps:
        assert is_float(s['loss']) and s['loss'] > 0
        assert s['lr'] == lr_at(s['step'], config), "logged lr is not the schedule's (or not exact)"
        assert is_float(s['tokens_per_s']) and s['tokens_per_s'] >= 0
        assert is_float(s['step_time_s']) and s['step_time_s'] >= 0
    ev = events(records, 'eval')
    c = config.eval_cadence
    assert [e['step'] for e in ev] == [s for s in range(first_step, last_step + 1) if s % c == 0] + \
        ([last_step] if last_step % c else [])
    for e in ev: assert is_float(e['val_loss']) and e['val_loss'] > 0
    sm = events(records, 'sample')
    assert sm and [e['step'] for e in sm] == [s for s in range(first_step, last_step + 1) if s % config.sampling_cadence == 0] + \
        ([last_step] if last_step % config.sampling_cadence else [])
    for e in sm: assert isinstance(e['sample_text'], str) and len(e['sample_text']) == config.sample_length
    cks = events(records, 'checkpoint')
    assert cks and cks[-1]['step'] == last_step
    for e in cks: assert isinstance(e['path'], str) and e['path'].endswith(f"step_{e['step']:06d}.pt")
    end = events(records, 'run_end')
    assert len(end) == 1 and records[-1] is end[0]
    assert end[0]['status'] == status and end[0]['step'] == last_step
    assert is_float(end[0]['wall_s']) and end[0]['wall_s'] >= 0


def ref_config(corpus, out, max_steps=REF_STEPS, **over):
    return TrainingConfig().with_overrides(**TINY, data_path=str(corpus), out_dir=str(out), max_steps=max_steps, **over)


def test_fresh_run_log_is_complete(ref_run, corpus):
    recs = ref_run.records
    check_common(recs)
    assert recs[0]['event'] == 'run_start' and len(events(recs, 'run_start')) == 1
    config = ref_config(corpus, ref_run.out)
    check_run_start(recs[0], config, corpus, None)
    check_events(recs, config, 1, REF_STEPS)
    # the checkpoints that were kept exist; the sample text uses the corpus's characters only
    kept = {p.name for p in ref_run.ckpt_dir.glob('step_*.pt')}
    assert kept and {Path(e['path']).name for e in events(recs, 'checkpoint')[-len(kept):]} == kept
    for e in events(recs, 'checkpoint')[-len(kept):]: assert Path(e['path']).is_file()
    chars = set(corpus.read_text(encoding='utf-8'))
    assert all(set(e['sample_text']) <= chars for e in events(recs, 'sample'))


def test_resumed_run_appends_with_same_run_id(run_a, corpus):
    recs = run_a.records
    check_common(recs)                      # one run id for both invocations
    first, second = segments(recs)
    cfg1 = ref_config(corpus, run_a.out, SHORT_STEPS)
    check_run_start(first[0], cfg1, corpus, None)
    check_events(first, cfg1, 1, SHORT_STEPS)
    ck12 = run_a.out / 'checkpoints' / f'step_{SHORT_STEPS:06d}.pt'
    # resuming from the run folder: the config continues in the folder the checkpoint lives in
    cfg2 = ref_config(corpus, run_a.out, REF_STEPS)
    assert second[0]['step'] == SHORT_STEPS
    check_run_start(second[0], cfg2, corpus, ck12)
    assert second[0]['resumed_from'] == events(first, 'checkpoint')[-1]['path']   # the file the first part saved last
    check_events(second, cfg2, SHORT_STEPS + 1, REF_STEPS)
    assert {k for k in first[0]['config'] if first[0]['config'][k] != second[0]['config'][k]} == {'max_steps'}
    assert first[0]['config_hash'] == second[0]['config_hash']   # max_steps says when to stop, not what is computed


def test_every_line_round_trips_exactly(ref_run, run_a):
    "Each line is canonical JSON: loading and dumping it again gives the same text, so floats are exact (repr)."
    for path in (ref_run.jsonl, run_a.jsonl):
        for line in path.read_text(encoding='utf-8').splitlines():
            assert json.dumps(json.loads(line)) == line


def test_logged_floats_equal_saved_floats(ref_run):
    "The val_loss in the log is the val_loss in the checkpoint, to the last bit (no rounding on the way)."
    evals = {e['step']: e['val_loss'] for e in events(ref_run.records, 'eval')}
    for p in ref_run.ckpt_dir.glob('step_*.pt'):
        ck = torch.load(p, map_location='cpu', weights_only=True)
        assert ck['last_val_loss'] == evals[ck['step']]
        assert ck['best_val_loss'] == min(v for s, v in evals.items() if s <= ck['step'])


def test_failed_run_logs_run_end_failed(corpus, tmp_path):
    "A run that diverges: exit 1 with an error line, and the log ends with run_end status 'failed'."
    r = cli_run(tmp_path / 'diverge', corpus, 20, check=False, learning_rate=1e30, min_lr=0.0, warmup_steps=0)
    p = r.proc
    assert p.returncode == 1, p.stderr
    assert 'Traceback' not in p.stderr and any(l.startswith('error:') for l in p.stderr.splitlines())
    check_common(r.records)
    end = r.records[-1]
    assert end['event'] == 'run_end' and end['status'] == 'failed' and is_float(end['wall_s'])
    assert 'nan' in end['error'] or 'inf' in end['error']
