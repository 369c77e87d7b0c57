"""`compile: true` runs torch.compile on the model: it computes the same losses as eager mode (within floating-point
reordering), its checkpoints are plain (no `_orig_mod.`), and they resume uncompiled on the compiled run's course."""
import pytest
import json, os, subprocess, sys

import torch


pytestmark = pytest.mark.slow   # the slow set (`pytest -m slow`): CI runs it after the quick loop

TINY = ['--set', 'n_layer=1', '--set', 'n_head=2', '--set', 'n_embd=32', '--set', 'block_size=16',
        '--set', 'batch_size=4', '--set', 'eval_batches=1', '--set', 'sample_length=10', '--set', 'log_cadence=1',
        '--set', 'device=cpu', '--set', 'threads=1', '--set', 'eval_cadence=0', '--set', 'sampling_cadence=0',
        '--set', 'warmup_steps=2', '--set', 'learning_rate=3e-3', '--set', 'progress=none']
# Measured on the 2-core CPU (torch 2.13): compiled vs eager losses differ by at most ~3e-7 (relative) over 9 steps;
# the tolerance leaves room for other CPUs' kernels while still catching a wrong model, schedule or data order
# (those move the loss by 1e-3 or more within a step or two).
RTOL = 1e-4


def train(out, *args):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-m', 'tinylm.main', *args, *TINY], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(l) for l in (out / 'train.jsonl').read_text().splitlines()]
    return {r['step']: r['loss'] for r in recs if r['event'] == 'step'}


def close(a, b): return abs(a - b) <= RTOL * abs(b)


def test_compiled_run_matches_eager_and_resumes_uncompiled(tmp_path):
    eager = train(tmp_path / 'eager', '--max-steps', '9', '--out-dir', str(tmp_path / 'eager'))
    straight = train(tmp_path / 'compiled', '--max-steps', '9', '--out-dir', str(tmp_path / 'compiled'),
                     '--set', 'compile=true')
    assert sorted(straight) == list(range(1, 10))
    worst = max(abs(straight[s] - eager[s]) / eager[s] for s in eager)
    assert all(close(straight[s], eager[s]) for s in eager), f"compiled vs eager: worst relative difference {worst:.2e}"

    out = tmp_path / 'resumed'
    first = train(out, '--max-steps', '6', '--out-dir', str(out), '--set', 'compile=true')
    ck = torch.load(out / 'checkpoints' / 'step_000006.pt', weights_only=True)
    assert ck['config']['compile'] is True
    assert not any(k.startswith('_orig_mod.') for k in ck['model'])
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-m', 'tinylm.main', '--resume', str(out), '--max-steps', '9',
                        '--set', 'compile=false'], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(l) for l in (out / 'train.jsonl').read_text().splitlines()]
    resumed = {r['step']: r['loss'] for r in recs if r['event'] == 'step'}
    assert sorted(resumed) == list(range(1, 10))
    assert all(close(first[s], straight[s]) for s in range(1, 7))
    assert all(close(resumed[s], straight[s]) for s in range(7, 10)), \
        f"uncompiled resume vs compiled straight run: {[(resumed[s], straight[s]) for s in range(7, 10)]}"


AVX2 = {'ATEN_CPU_CAPABILITY': 'avx2', 'ONEDNN_MAX_CPU_ISA': 'AVX2'}
MODERN = ['--set', 'optimizer=muon', '--set', 'pos_emb=rope', '--set', 'norm=rmsnorm', '--set', 'qk_norm=true',
          '--set', 'activation=relu2', '--set', 'tie_embeddings=false']


def run_env(out, extra_env, *args):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', **extra_env}
    r = subprocess.run([sys.executable, '-m', 'tinylm.main', '--max-steps', '4', '--out-dir', str(out), *MODERN, *TINY,
                        *args], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    recs = [json.loads(l) for l in (out / 'train.jsonl').read_text().splitlines()]
    return {r['step']: r['loss'] for r in recs if r['event'] == 'step'}


@pytest.mark.parametrize('first,then', [('native', 'avx2'), ('avx2', 'native')])
def test_a_compile_cache_shared_by_two_vector_widths_stays_correct(tmp_path, first, then):
    """Inductor's on-disk cache did not record the vector width it generated code for: an AVX2-held run reusing a
    native run's kernels got NaN, the other way round the heap was corrupted (exit 134). compile_model keys the cache
    by the width; both orders now train as eager does."""
    kinds = {'native': {}, 'avx2': AVX2}
    cache = {'TORCHINDUCTOR_CACHE_DIR': str(tmp_path / 'cache')}
    run_env(tmp_path / 'fill', {**kinds[first], **cache}, '--set', 'compile=true')
    got = run_env(tmp_path / 'reuse', {**kinds[then], **cache}, '--set', 'compile=true')
    eager = run_env(tmp_path / 'eager', kinds[then])
    assert all(close(got[s], eager[s]) for s in eager), (got, eager)
