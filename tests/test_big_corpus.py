"""Corpora bigger than memory: a folder of text files as one corpus, prepared memory-mapped token files used by runs,
resumes and torchrun ranks (with the same numbers as the in-memory path), clear errors, and bounded memory."""
from __future__ import annotations
import hashlib, subprocess

import pytest

from conftest import assert_clean_error, env, read_jsonl, segments, tiny_args, tinylm_train_exe
from test_resume import assert_matches_reference


def prepared_env(tmp_path, **extra) -> dict:
    "Every corpus goes through the cache (the threshold is 0 MB), in a cache folder of the test's own."
    return {**env(), 'TINYLM_CACHE_DIR': str(tmp_path / 'cache'), 'TINYLM_CACHE_MIN_MB': '0', **extra}


def train(args, e, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([tinylm_train_exe(), *map(str, args)], capture_output=True, text=True, env=e, timeout=timeout)


def test_a_prepared_corpus_gives_the_in_memory_numbers_and_resumes_exactly(ref_run, corpus, tmp_path):
    e, out = prepared_env(tmp_path), tmp_path / 'prepared'
    p = train(['--data', corpus, '--out-dir', out, '--max-steps', 12, *tiny_args()], e)
    assert p.returncode == 0, p.stderr[-3000:]
    entry, = (tmp_path / 'cache').iterdir()
    assert (entry / 'corpus.json').is_file() and len(list(entry.glob('ids-*.bin'))) == 1
    p = train(['--resume', out, '--max-steps', 20], e)
    assert p.returncode == 0, p.stderr[-3000:]
    first, second = segments(read_jsonl(out / 'train.jsonl'))
    assert_matches_reference(first, ref_run, 1, 12)          # memory-mapped ids == in-memory ids: the same run
    assert_matches_reference(second, ref_run, 13, 20)
    assert first[0]['data_sha256'] == ref_run.records[0]['data_sha256'] == hashlib.sha256(corpus.read_bytes()).hexdigest()


def test_a_folder_of_text_files_is_one_corpus(corpus, tmp_path):
    lines = corpus.read_text(encoding='utf-8').splitlines(keepends=True)
    folder = tmp_path / 'dump'; folder.mkdir()
    parts = [''.join(lines[:200]), ''.join(lines[200:400]).rstrip('\n'), ''.join(lines[400:])]
    for name, text in zip(('02.txt', '01.txt', '03.txt'), parts): (folder / name).write_text(text, encoding='utf-8')
    (folder / 'README.md').write_text('not part of the corpus')
    joined = parts[1] + '\n' + parts[0] + parts[2]           # name order; a newline where 01.txt lacks one
    out = tmp_path / 'run'
    p = train(['--data', folder, '--out-dir', out, '--max-steps', 4, *tiny_args()], env())
    assert p.returncode == 0, p.stderr[-3000:]
    start = read_jsonl(out / 'train.jsonl')[0]
    assert start['data_sha256'] == hashlib.sha256(joined.encode('utf-8')).hexdigest()
    (folder / '03.txt').write_text(parts[2] + 'one more line.\n', encoding='utf-8')
    p = train(['--resume', out, '--max-steps', 8], env())
    assert_clean_error(p.returncode, p.stdout, p.stderr, 1, ('differs from the corpus', '--allow-data-change'))


def test_an_unusable_cache_is_a_clear_error(corpus, tmp_path):
    (tmp_path / 'a_file').write_text('x')
    e = prepared_env(tmp_path, TINYLM_CACHE_DIR=str(tmp_path / 'a_file' / 'cache'))
    p = train(['--data', corpus, '--out-dir', tmp_path / 'run', '--max-steps', 4, *tiny_args()], e)
    assert_clean_error(p.returncode, p.stdout, p.stderr, 1, ('cannot prepare', 'a part of the path is not a folder',
                                                              'TINYLM_CACHE_DIR'))
    assert not (tmp_path / 'run').exists()
    p = train(['--data', corpus, '--out-dir', tmp_path / 'run', '--max-steps', 4, *tiny_args()],
              prepared_env(tmp_path, TINYLM_CACHE_MIN_MB='lots'))
    assert_clean_error(p.returncode, p.stdout, p.stderr, 1, 'TINYLM_CACHE_MIN_MB must be a number of megabytes')


@pytest.mark.slow
def test_torchrun_ranks_share_one_prepared_corpus(corpus, tmp_path):
    "Two processes prepare nothing twice (the first prepares, the other waits) and train like one process."
    from test_distributed import TINY, torchrun, single, losses, _env
    e = {**_env(), 'TINYLM_CACHE_DIR': str(tmp_path / 'cache'), 'TINYLM_CACHE_MIN_MB': '0'}
    two, one = tmp_path / 'two', tmp_path / 'one'
    r = torchrun(['--data', str(corpus), '--max-steps', '8', '--out-dir', str(two), *TINY], env=e)
    assert r.returncode == 0, r.stderr[-3000:]
    entry, = (tmp_path / 'cache').iterdir()
    assert len(list(entry.glob('ids-*.bin'))) == 1 and not list(entry.glob('.*.tmp'))
    r = single(['--data', str(corpus), '--max-steps', '8', '--out-dir', str(one), *TINY])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert max(abs(a[s] - b[s]) / a[s] for s in a) < 1e-5


@pytest.mark.slow
def test_a_big_corpus_prepares_in_bounded_memory_and_starts_fast(tmp_path):
    "64 MB (above the 32 MB threshold): preparation and a run on it stay far below the corpus's in-memory cost."
    from tinylm.config import TrainingConfig
    from tinylm.measure import prepare_times
    r = prepare_times(TrainingConfig(threads=1), 64, tmp_path, documents=False)   # one text, as before documents
    assert r['tokens'] == 64_000_000
    assert r['prepare_peak_rss_mb'] < 900, r          # chunks of 16 MB, not the whole corpus
    assert r['run_peak_rss_mb'] < 600, r              # the baby model on a memory-mapped corpus
    assert 60 < r['disk_mb'] < 70, r                  # one byte per character (65 characters: uint8)
