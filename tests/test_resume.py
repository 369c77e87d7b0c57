"""Resume is exact: a resumed run logs the bit-identical loss at every step that the straight run logs,
whether it was stopped by --max-steps, by SIGINT or by SIGTERM."""
from __future__ import annotations
import random, shutil, signal, subprocess, sys, textwrap

import pytest
import torch

from conftest import (REF_RESUME_FROM, REF_STEPS, SHORT_STEPS, assert_clean_error, env, events, losses, popen_cli,
                      read_jsonl, run_cli, segments, tiny_args, wait_for_step)

from tinylm.main import main


def by_step(records, event, field):
    return {r['step']: r[field] for r in records if r['event'] == event}


def assert_matches_reference(records, ref, first: int, last: int):
    "Steps first..last were each logged once, with exactly the reference's loss, lr, val_loss and samples."
    L = losses(records)
    assert sorted(L) == list(range(first, last + 1)), f"logged steps {sorted(L)}"
    for s in range(first, last + 1):
        assert L[s] == ref.losses[s], f"step {s}: resumed loss {L[s]!r} != straight {ref.losses[s]!r}"
    for event, field in (('step', 'lr'), ('eval', 'val_loss'), ('sample', 'sample_text')):
        got, want = by_step(records, event, field), by_step(ref.records, event, field)
        common = [s for s in got if s in want]
        assert {s: got[s] for s in common} == {s: want[s] for s in common}, f"{event}.{field} differs"


def test_resume_from_step_checkpoint_is_bit_identical(ref_run, tmp_path):
    ckpt = ref_run.ckpt_dir / f'step_{REF_RESUME_FROM:06d}.pt'
    out = tmp_path / 'resumed'
    p = run_cli(['--resume', ckpt, '--out-dir', out, '--max-steps', REF_STEPS])
    assert p.returncode == 0, p.stderr[-3000:]
    assert f'resuming from {ckpt} at step {REF_RESUME_FROM}' in p.stdout
    recs = read_jsonl(out / 'train.jsonl')
    start = recs[0]
    assert start['event'] == 'run_start' and start['step'] == REF_RESUME_FROM
    assert start['run_id'] == ref_run.records[0]['run_id']
    assert start['resumed_from'] == str(ckpt)
    assert_matches_reference(recs, ref_run, REF_RESUME_FROM + 1, REF_STEPS)
    assert sorted(by_step(recs, 'eval', 'val_loss')) == list(range(36, REF_STEPS + 1, 4))
    # the resumed run's final weights are the straight run's final weights
    a = torch.load(out / 'checkpoints' / f'step_{REF_STEPS:06d}.pt', weights_only=True)
    b = torch.load(ref_run.ckpt_dir / f'step_{REF_STEPS:06d}.pt', weights_only=True)
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in b['model'])
    assert a['sampler'] == b['sampler']


def test_max_steps_then_resume_equals_straight_run(run_a, ref_run):
    "Run A: --max-steps 12, then --resume <out> --max-steps 48 == a straight 48-step run (horizon: lr_decay_steps)."
    assert run_a.first.returncode == 0 and 'done: step 12' in run_a.first.stdout
    segs = segments(run_a.records)
    assert len(segs) == 2
    assert_matches_reference(segs[0], ref_run, 1, SHORT_STEPS)
    assert_matches_reference(segs[1], ref_run, SHORT_STEPS + 1, REF_STEPS)
    # the counter continues at k + 1, in the same log, under the same run id
    assert segs[1][0]['step'] == SHORT_STEPS
    assert [r['step'] for r in segs[1] if r['event'] == 'step'][0] == SHORT_STEPS + 1
    assert {r['run_id'] for r in run_a.records} == {run_a.records[0]['run_id']}
    assert 'resuming from' in run_a.proc.stdout


def test_resume_may_change_cadences_and_data_path(ref_run, corpus, tmp_path):
    "eval_cadence and data_path (same content) are resumable fields: allowed, and the losses are unaffected."
    copy = tmp_path / 'same_text.txt'
    shutil.copyfile(corpus, copy)
    out = tmp_path / 'recad'
    p = run_cli(['--resume', ref_run.ckpt_dir / f'step_{REF_RESUME_FROM:06d}.pt', '--out-dir', out,
                 '--max-steps', REF_STEPS, '--set', 'eval_cadence=3', '--data', copy])
    assert p.returncode == 0, p.stderr[-3000:]
    recs = read_jsonl(out / 'train.jsonl')
    assert recs[0]['config']['eval_cadence'] == 3 and recs[0]['config']['data_path'] == str(copy)
    assert sorted(by_step(recs, 'eval', 'val_loss')) == [33, 36, 39, 42, 45, 48]
    assert_matches_reference(recs, ref_run, REF_RESUME_FROM + 1, REF_STEPS)


def test_resume_on_changed_corpus_when_allowed(saved_run, corpus, tmp_path, capsys):
    "--allow-data-change: the same characters in another order train on, from the checkpoint's step."
    lines = corpus.read_text(encoding='utf-8').splitlines()
    random.Random(5).shuffle(lines)
    other = tmp_path / 'shuffled.txt'
    other.write_text('\n'.join(lines) + '\n', encoding='utf-8')
    rc = main(['--resume', str(saved_run.out), '--max-steps', str(REF_STEPS + 3), '--data', str(other),
               '--allow-data-change'])
    out, err = capsys.readouterr()
    assert rc == 0, err
    segs = segments(read_jsonl(saved_run.jsonl))
    assert len(segs) == 2 and segs[1][0]['config']['data_path'] == str(other)
    assert sorted(losses(segs[1])) == [REF_STEPS + 1, REF_STEPS + 2, REF_STEPS + 3]


# ---------------------------------------------------------------- signals
def interrupt(tmp_path, corpus, sig, min_step=5, second=False, name='sig'):
    "Start an endless run, wait for step >= min_step, send `sig` (twice if `second`); returns (proc, out, stdout, stderr)."
    out = tmp_path / name
    proc = popen_cli(['--data', corpus, '--out-dir', out, '--max-steps', 100000, *tiny_args()])
    try:
        wait_for_step(out / 'train.jsonl', proc, min_step)
        proc.send_signal(sig)
        if second: proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None: proc.kill(); proc.communicate()
    return proc, out, stdout, stderr


def check_stopped_run(out, stdout, stderr, signame):
    "The state an interrupted run must leave: a whole checkpoint at the step it stopped, a run_end, a hint."
    assert 'Traceback' not in stderr and 'Traceback' not in stdout, stderr
    assert 'unexpected' not in stderr, stderr
    recs = read_jsonl(out / 'train.jsonl')
    stop = max(losses(recs))
    end = events(recs, 'run_end')
    assert len(end) == 1 and end[0]['status'] == 'interrupted' and end[0]['step'] == stop, end
    assert recs[-1]['event'] == 'run_end'
    ck_path = out / 'checkpoints' / f'step_{stop:06d}.pt'
    assert ck_path.is_file(), f"no checkpoint at the stop step {stop}: {sorted(p.name for p in (out / 'checkpoints').iterdir())}"
    assert (out / 'checkpoints' / 'latest').read_text(encoding='utf-8').strip() == ck_path.name
    assert not [p for p in (out / 'checkpoints').iterdir() if p.name.endswith('.tmp')]
    ck = torch.load(ck_path, map_location='cpu', weights_only=True)
    assert ck['step'] == stop
    assert signame in stdout and '--resume' in stdout and str(ck_path) in stdout, stdout
    return stop


@pytest.mark.parametrize('sig,code', [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=['SIGINT', 'SIGTERM'])
def test_signal_stops_cleanly_and_resumes_exactly(ref_run, corpus, tmp_path, sig, code):
    proc, out, stdout, stderr = interrupt(tmp_path, corpus, sig, name=sig.name)
    assert proc.returncode == code, f"rc={proc.returncode}\n{stdout[-2000:]}\n{stderr[-2000:]}"
    stop = check_stopped_run(out, stdout, stderr, sig.name)
    assert stop + 4 <= REF_STEPS, f"stopped at step {stop}: too late to compare with the {REF_STEPS}-step reference"
    # the part before the signal is the straight run
    assert_matches_reference(read_jsonl(out / 'train.jsonl'), ref_run, 1, stop)
    if sig == signal.SIGTERM: return          # resuming is checked once, after SIGINT
    p = run_cli(['--resume', out, '--max-steps', stop + 4])
    assert p.returncode == 0, p.stderr[-3000:]
    segs = segments(read_jsonl(out / 'train.jsonl'))
    assert len(segs) == 2 and segs[1][0]['resumed_from'] == str(out / 'checkpoints' / f'step_{stop:06d}.pt')
    assert_matches_reference(segs[1], ref_run, stop + 1, stop + 4)


def test_double_sigint_corrupts_nothing(ref_run, corpus, tmp_path):
    "Two SIGINTs back to back (an impatient Ctrl-C Ctrl-C): still a clean stop and an exact resume."
    proc, out, stdout, stderr = interrupt(tmp_path, corpus, signal.SIGINT, second=True, name='double')
    assert proc.returncode == 130, f"rc={proc.returncode}\n{stdout[-2000:]}\n{stderr[-2000:]}"
    for f in (out / 'checkpoints').glob('step_*.pt'):
        torch.load(f, map_location='cpu', weights_only=True)
    stop = check_stopped_run(out, stdout, stderr, 'SIGINT')
    assert stop + 3 <= REF_STEPS
    p = run_cli(['--resume', out, '--max-steps', stop + 3])
    assert p.returncode == 0, p.stderr[-3000:]
    assert_matches_reference(segments(read_jsonl(out / 'train.jsonl'))[1], ref_run, stop + 1, stop + 3)


SIGNAL_SCRIPT = textwrap.dedent('''
    # Runs tinylm_train's main() with one extra hook that sends SIGINT to its own process at planned moments,
    # e.g. "step=6,after_fit": once right after step 6, once more when the stop sequence (after_fit) has begun.
    import os, signal, sys
    import tinylm.main as M
    from tinylm.trainer import Hook
    PLAN = sys.argv[1].split(',')

    class Signals(Hook):
        order = 1       # right after GracefulStop (order 0); before the evaluator, checkpointer and loggers
        def kill(self): os.kill(os.getpid(), signal.SIGINT)
        def before_fit(self, t):
            if 'before_fit' in PLAN: self.kill()
        def after_step(self, t):
            if f'step={t.step}' in PLAN: self.kill()
        def after_fit(self, t):
            if 'after_fit' in PLAN: self.kill()

    standard = M.standard_hooks
    M.standard_hooks = lambda config, **kw: standard(config, **kw) + [Signals()]
    sys.exit(M.main(sys.argv[2:]))
''')


def run_with_signals(tmp_path, corpus, plan):
    script = tmp_path / 'signals.py'
    script.write_text(SIGNAL_SCRIPT, encoding='utf-8')
    out = tmp_path / 'planned'
    p = subprocess.run([sys.executable, str(script), plan, '--data', str(corpus), '--out-dir', str(out),
                        '--max-steps', '100000', *tiny_args()], capture_output=True, text=True, env=env(), timeout=120)
    return p, out


def test_second_sigint_during_shutdown_keeps_final_checkpoint(corpus, tmp_path):
    """A second Ctrl-C that lands while the stop sequence runs (after_fit: final checkpoint, run_end) must not
    abort it. Deterministic version of the race a real double Ctrl-C can hit: the signals are sent from a hook."""
    stop = 6                                   # not on the checkpoint cadence (8): after_fit must save it
    p, out = run_with_signals(tmp_path, corpus, f'step={stop},after_fit')
    assert p.returncode == 130, f"rc={p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    assert 'nothing was saved' not in p.stderr, f"misleading message after {stop} trained steps:\n{p.stderr}"
    assert check_stopped_run(out, p.stdout, p.stderr, 'SIGINT') == stop


def test_stop_before_first_step_gives_no_bogus_resume_hint(corpus, tmp_path):
    "Interrupted before step 1: nothing to resume, so no 'resume with ... None' hint; a clean interrupted run_end."
    p, out = run_with_signals(tmp_path, corpus, 'before_fit')
    assert p.returncode == 130, f"rc={p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    assert 'Traceback' not in p.stderr
    recs = read_jsonl(out / 'train.jsonl')
    assert recs[-1]['event'] == 'run_end' and recs[-1]['status'] == 'interrupted' and recs[-1]['step'] == 0
    assert not list(out.glob('checkpoints/step_*.pt')), "a checkpoint of step 0 was saved"
    assert '--resume None' not in p.stdout and 'checkpoint: None' not in p.stdout, p.stdout


def test_float16_scales_its_loss_and_resumes_exactly(corpus, tmp_path):
    "precision float16 (CPU autocast here; T4/V100/MPS for real) trains with a GradScaler whose state travels in the"
    "checkpoint: 10 straight == 6 + resume + 4; a float16 checkpoint without a scale (tinylm < 0.3) is refused."
    fp16 = dict(precision='float16', dropout=0.0)
    straight = run_cli(['--data', corpus, '--out-dir', tmp_path / 'a', '--max-steps', 10, *tiny_args(**fp16)])
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = run_cli(['--data', corpus, '--out-dir', tmp_path / 'b', '--max-steps', 6, *tiny_args(**fp16)])
    assert first.returncode == 0, first.stderr[-3000:]
    path = tmp_path / 'b' / 'checkpoints' / 'step_000006.pt'
    ck = torch.load(path, weights_only=True)
    assert ck['scaler']['scale'] > 1, ck['scaler']
    second = run_cli(['--resume', tmp_path / 'b', '--max-steps', 10])
    assert second.returncode == 0, second.stderr[-3000:]
    a = losses(read_jsonl(tmp_path / 'a' / 'train.jsonl'))
    b1, b2 = segments(read_jsonl(tmp_path / 'b' / 'train.jsonl'))
    assert {**losses(b1), **losses(b2)} == a and a[10] < a[1], a
    del ck['scaler']; torch.save(ck, path)       # as tinylm 0.2 wrote it
    p = run_cli(['--resume', path, '--max-steps', 12])
    assert_clean_error(p.returncode, p.stdout, p.stderr, 1, ('without a loss scale', '--set precision=float32'))
    p = run_cli(['--resume', path, '--max-steps', 12, '--set', 'precision=float32'])
    assert p.returncode == 0, p.stderr[-3000:]
