"""The GPU check (.ci/gpu_check.py) is tested where there is no GPU: the same logic on the CPU with a tiny model, so
that the first GPU machine lent runs a script that already works."""
import json, os, subprocess, sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / '.ci' / 'gpu_check.py'


def test_the_gpu_check_runs_every_check_on_the_cpu(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), '--device', 'cpu', '--quick', '--json', str(tmp_path / 'g.json')],
                       capture_output=True, text=True, timeout=900, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / 'g.json').read_text())['results']
    assert [x['check'] for x in res] == ['bf16+compile', 'fp16+scaler', 'resume', 'bench', 'ddp', 'sample']
    assert all(x['ok'] for x in res), res
    assert 'bit-identical' in res[2]['detail'] and 'loss scale' in res[1]['detail']
    assert 'summary: 6 passed, 0 failed' in r.stdout


def test_without_a_gpu_it_says_so(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'CUDA_VISIBLE_DEVICES': ''})
    assert r.returncode == 2 and r.stderr.startswith('error: no CUDA device here'), r.stderr
