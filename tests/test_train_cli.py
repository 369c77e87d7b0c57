"""End to end: corpus -> tokenizer -> datasets -> training -> checkpoints, through the installed `tinylm_train`
and through the Python API; reproducibility; a learning smoke test on the bundled corpus."""
from __future__ import annotations
import pytest
import math, random, re

import numpy as np
import torch

from conftest import (REF_STEPS, TINY, cli_run, events, losses, read_jsonl, run_cli, tiny_args)

from tinylm.config import TrainingConfig
from tinylm.data import make_dataloaders
from tinylm.main import build_config, build_trainer, main, make_parser, prepare_data
from tinylm.trainer import Evaluator, Hook, Sampler, Trainer, load_checkpoint


def ckpt_files(folder):
    return sorted(p.name for p in folder.glob('step_*.pt'))


class Recorder(Hook):
    "Records the exact loss of every step (read from the trainer, not from a log file)."
    def __init__(self): self.losses, self.samples = {}, {}
    def after_step(self, t): self.losses[t.step] = t.last_loss.item()
    def after_sample(self, t): self.samples[t.step] = t.last_sample


# ---------------------------------------------------------------- the installed command line
def test_cli_straight_run_completes(ref_run, corpus):
    p = ref_run.proc
    assert p.returncode == 0
    assert 'Traceback' not in p.stderr and 'error:' not in p.stderr
    assert 'starting a new run' in p.stdout and f'done: step {REF_STEPS}' in p.stdout
    # every step was logged once (log_cadence=1), and the losses are real numbers near ln(vocab) at the start
    assert sorted(ref_run.losses) == list(range(1, REF_STEPS + 1))
    vocab = len(set(corpus.read_text(encoding='utf-8')))
    assert abs(ref_run.losses[1] - math.log(vocab)) < 0.5
    assert all(math.isfinite(v) for v in ref_run.losses.values())
    # training did something: the learning rate is high enough here for the loss to fall within 48 steps
    assert ref_run.losses[REF_STEPS] < ref_run.losses[1] - 0.3
    end = events(ref_run.records, 'run_end')
    assert [e['status'] for e in end] == ['completed'] and end[0]['step'] == REF_STEPS


def test_checkpoint_rotation_and_latest_pointer(ref_run):
    saved = [e for e in events(ref_run.records, 'checkpoint')]
    assert [e['step'] for e in saved] == [8, 16, 24, 32, 40, 48]     # cadence 8, final step 48 is on the cadence
    keep = TrainingConfig().keep_checkpoints
    assert ckpt_files(ref_run.ckpt_dir) == ['step_000032.pt', 'step_000040.pt', 'step_000048.pt'][-keep:]
    for e in saved[-keep:]: assert (ref_run.out / 'checkpoints' / f"step_{e['step']:06d}.pt").is_file()
    for e in saved[:-keep]: assert not (ref_run.ckpt_dir / f"step_{e['step']:06d}.pt").exists()
    assert (ref_run.ckpt_dir / 'latest').read_text(encoding='utf-8').strip() == 'step_000048.pt'
    assert not [p.name for p in ref_run.ckpt_dir.iterdir() if p.name.endswith('.tmp')], "temporary files left behind"


def test_final_checkpoint_saved_off_cadence(run_a):
    "A run that ends between cadence steps still saves its last step."
    seg1 = [r for r in run_a.records if r['event'] == 'checkpoint' and r['step'] <= 12]
    assert [e['step'] for e in seg1] == [8, 12]


def test_checkpoints_are_plain_clean_data(ref_run, corpus):
    start = events(ref_run.records, 'run_start')[0]
    evals = {e['step']: e for e in events(ref_run.records, 'eval')}
    for name in ckpt_files(ref_run.ckpt_dir):
        path = ref_run.ckpt_dir / name
        ck = torch.load(path, map_location='cpu', weights_only=True)   # no pickled objects needed
        step = int(re.match(r'step_(\d+)\.pt', name).group(1))
        assert ck['format'] == 'tinylm-checkpoint' and ck['step'] == step
        assert ck['run_id'] == start['run_id'] and ck['config'] == start['config']
        keys = list(ck['model'])
        assert keys and not [k for k in keys if k.startswith(('module.', '_orig_mod.'))], keys
        assert isinstance(ck['optimizer']['state'], dict) and ck['optimizer']['state'], "optimizer state missing"
        assert ck['version'] == 4 and ck['sampler'] == {'batches_consumed': step}   # grad_accum_steps 1
        # values logged and values saved are the same floats, bit for bit
        assert ck['last_val_loss'] == evals[step]['val_loss']
        assert ck['best_val_loss'] == evals[step]['best_val_loss']
        # and the package's own loader accepts it
        assert load_checkpoint(path)['step'] == step
    # a run folder resolves to its latest checkpoint
    assert load_checkpoint(ref_run.out)['step'] == REF_STEPS


def test_compiled_model_checkpoint_has_clean_keys(tmp_path, corpus):
    "torch.compile wraps the model (keys `_orig_mod.*`); the checkpoint must hold the plain module's keys."
    args = make_parser().parse_args(['--data', str(corpus), '--out-dir', str(tmp_path / 'c'), '--max-steps', '4',
                                     *tiny_args(compile=True)])
    config = build_config(args)
    trainer, _ = build_trainer(config, hooks=[])
    wrapped = list(trainer.model.state_dict())
    assert all(k.startswith('_orig_mod.') for k in wrapped), "sanity: the model should really be compiled"
    path = trainer.save_checkpoint(tmp_path / 'compiled.pt')
    ck = torch.load(path, map_location='cpu', weights_only=True)
    assert sorted(ck['model']) == sorted(k.removeprefix('_orig_mod.') for k in wrapped)
    assert not [k for k in ck['model'] if k.startswith(('module.', '_orig_mod.'))]
    t2 = Trainer.from_checkpoint(path, hooks=[])
    assert not hasattr(t2.model, '_orig_mod')


# ---------------------------------------------------------------- reproducibility
def test_same_seed_same_run(ref_run, corpus, tmp_path):
    again = cli_run(tmp_path / 'again', corpus, REF_STEPS)
    assert again.losses == ref_run.losses                              # every step, exactly
    samples = lambda r: [(e['step'], e['sample_text']) for e in events(r.records, 'sample')]
    assert samples(again) == samples(ref_run) and len(samples(again)) == REF_STEPS // TINY['sampling_cadence']
    vals = lambda r: [(e['step'], e['val_loss']) for e in events(r.records, 'eval')]
    assert vals(again) == vals(ref_run)
    # it is a new run nevertheless
    assert again.records[0]['run_id'] != ref_run.records[0]['run_id']
    # and the checkpoints hold identical weights
    a = torch.load(again.ckpt_dir / 'step_000048.pt', weights_only=True)['model']
    b = torch.load(ref_run.ckpt_dir / 'step_000048.pt', weights_only=True)['model']
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_different_seed_different_run(ref_run, corpus, tmp_path):
    other = cli_run(tmp_path / 'other', corpus, 8, '--seed', '7')
    assert other.records[0]['config']['seed'] == 7
    assert sorted(other.losses) == list(range(1, 9))
    assert all(other.losses[s] != ref_run.losses[s] for s in range(1, 9))


# ---------------------------------------------------------------- the Python API
def test_python_main_matches_cli(ref_run, corpus, tmp_path, capsys):
    out = tmp_path / 'api_main'
    rc = main(['--data', str(corpus), '--out-dir', str(out), '--max-steps', str(REF_STEPS), *tiny_args()])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    recs = read_jsonl(out / 'train.jsonl')
    assert losses(recs) == ref_run.losses
    assert [e['sample_text'] for e in events(recs, 'sample')] == [e['sample_text'] for e in events(ref_run.records, 'sample')]
    # and resume through main() as well
    rc = main(['--resume', str(out), '--max-steps', str(REF_STEPS + 4)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert 'resuming from' in captured.out
    segs = [s for s in read_jsonl(out / 'train.jsonl') if s['event'] == 'step' and s['step'] > REF_STEPS]
    assert [s['step'] for s in segs] == list(range(REF_STEPS + 1, REF_STEPS + 5))


def test_python_api_fit_save_resume(ref_run, corpus, tmp_path):
    "build_config -> build_trainer -> fit -> save_checkpoint -> Trainer.from_checkpoint -> fit == the CLI run."
    args = make_parser().parse_args(['--data', str(corpus), '--out-dir', str(tmp_path / 'api'),
                                     '--max-steps', str(REF_STEPS), *tiny_args()])
    config = build_config(args)
    assert config.max_steps == REF_STEPS and config.dropout == 0.1 and config.n_embd == 32
    rec = Recorder()
    trainer, train_dl = build_trainer(config, hooks=[rec, Evaluator(), Sampler()])
    trainer.fit(train_dl, max_steps=20)
    assert trainer.step == 20 and trainer.status == 'completed'
    path = trainer.save_checkpoint(tmp_path / 'api' / 'mid.pt')
    assert path.is_file()
    run_id = trainer.run_id

    # disturb every global RNG: the checkpoint, not the process state, must decide what comes next
    torch.rand(1000); random.random(); np.random.rand(10); torch.manual_seed(999)

    tok, train_ds, val_ds, _ = prepare_data(config)
    train_dl2, val_dl2 = make_dataloaders(train_ds, val_ds, config)
    rec2 = Recorder()
    t2 = Trainer.from_checkpoint(path, val_dl2, hooks=[rec2, Evaluator(), Sampler()])
    assert t2.step == 20 and t2.run_id == run_id and t2.config == config
    assert t2.tokenizer == trainer.tokenizer == tok
    t2.fit(train_dl2)
    assert t2.step == REF_STEPS and t2.status == 'completed'
    assert sorted(rec2.losses) == list(range(21, REF_STEPS + 1))       # the step counter continues at 21
    assert {**rec.losses, **rec2.losses} == ref_run.losses              # bit-identical to the CLI run
    ref_samples = {e['step']: e['sample_text'] for e in events(ref_run.records, 'sample')}
    assert {**rec.samples, **rec2.samples} == ref_samples


# ---------------------------------------------------------------- does it learn?
@pytest.mark.slow
def test_learns_on_bundled_corpus(tmp_path):
    "Default model, default (bundled Tiny Shakespeare) corpus, 300 steps: well below chance (ln 65 = 4.17)."
    out = tmp_path / 'learn'
    p = run_cli(['--out-dir', out, '--max-steps', 300, '--set', 'eval_batches=10', '--set', 'eval_cadence=100',
                 '--set', 'device=cpu', '--set', 'threads=1', '--set', 'log_cadence=10'], timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = read_jsonl(out / 'train.jsonl')
    start = events(recs, 'run_start')[0]
    assert start['vocab_size'] == 65
    defaults = TrainingConfig()
    for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size', 'data_path'):
        assert start['config'][k] == getattr(defaults, k)
    L = losses(recs)
    assert abs(L[10] - math.log(65)) < 1.0
    last = [L[s] for s in (260, 270, 280, 290, 300)]
    assert sum(last) / len(last) < 2.8, last
    vals = [(e['step'], e['val_loss']) for e in events(recs, 'eval')]
    assert [s for s, _ in vals] == [100, 200, 300]
    assert vals[-1][1] < vals[0][1] and vals[-1][1] < 2.8, vals
