"""`compile: true` runs torch.compile on the model; its checkpoints are plain (no `_orig_mod.`) and resume uncompiled."""
import json, os, subprocess, sys

import torch

TINY = ['--set', 'n_layer=1', '--set', 'n_head=2', '--set', 'n_embd=32', '--set', 'block_size=16',
        '--set', 'batch_size=4', '--set', 'eval_batches=1', '--set', 'sample_length=10', '--set', 'log_cadence=1',
        '--set', 'device=cpu', '--set', 'threads=1', '--set', 'eval_cadence=0', '--set', 'sampling_cadence=0']


def test_compiled_checkpoint_resumes_uncompiled(tmp_path):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    out = tmp_path / 'run'
    r = subprocess.run([sys.executable, '-m', 'tinylm.main', '--max-steps', '6', '--out-dir', str(out), *TINY,
                        '--set', 'compile=true'], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(out / 'checkpoints' / 'step_000006.pt', weights_only=True)
    assert ck['config']['compile'] is True
    assert not any(k.startswith('_orig_mod.') for k in ck['model'])
    r = subprocess.run([sys.executable, '-m', 'tinylm.main', '--resume', str(out), '--max-steps', '9',
                        '--set', 'compile=false'], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [json.loads(l) for l in (out / 'train.jsonl').read_text().splitlines()]
    losses = [s['loss'] for s in steps if s['event'] == 'step']
    assert [s['step'] for s in steps if s['event'] == 'step'] == list(range(1, 10))
    assert all(l == l and 0 < l < 10 for l in losses)   # finite, sensible
