"""Byte-level BPE end to end: a trained tokenizer travels in the checkpoint, runs resume bit-identically, sampling
streams whole characters, bits per byte are logged, and every bad tokenizer setting is one clear error."""
from __future__ import annotations
import json, math, subprocess, sys

import pytest
import torch

from conftest import assert_clean_error, env, events, losses, read_jsonl, run_cli, segments, snapshot, tiny_args

BPE = dict(tokenizer='bpe', bpe_vocab_size=300)


def multibyte_corpus(path):
    "A corpus with accents, Greek and emoji: characters of two, three and four bytes."
    words = 'the café naïve über Καλημέρα 東京 🙂 river stone king queen'.split()
    lines = [' '.join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 6)) + '.' for i in range(800)]
    path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
    return path


@pytest.fixture(scope='module')
def bpe_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp('bpe')
    corpus = multibyte_corpus(folder / 'corpus.txt')
    out = folder / 'run'
    p = run_cli(['--data', corpus, '--out-dir', out, '--max-steps', 12, *tiny_args(**BPE)])
    assert p.returncode == 0, p.stderr[-3000:]
    return corpus, out


def test_bpe_run_logs_its_tokenizer_and_bits_per_byte(bpe_run):
    corpus, out = bpe_run
    recs = read_jsonl(out / 'train.jsonl')
    start = events(recs, 'run_start')[0]
    assert (start['tokenizer']['kind'], start['tokenizer']['vocab_size'], start['vocab_size']) == ('bpe', 300, 300)
    ck = torch.load(out / 'checkpoints' / 'step_000012.pt', weights_only=True)     # plain data
    assert ck['version'] == 4 and ck['tokenizer']['kind'] == 'bpe'
    from tinylm.bpe import BPETokenizer
    assert BPETokenizer.from_state_dict(ck['tokenizer']).sha256 == start['tokenizer']['sha256']
    for ev in events(recs, 'eval'):
        assert 0 < ev['val_bpb'] < ev['val_bpc'] < ev['val_loss'] / math.log(2)   # multi-byte text, tokens of >1 char


def test_bpe_run_resumes_bit_identically(bpe_run, tmp_path):
    corpus, out = bpe_run
    first = run_cli(['--data', corpus, '--out-dir', tmp_path / 'b', '--max-steps', 6, *tiny_args(**BPE)])
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(['--resume', tmp_path / 'b', '--max-steps', 12])
    assert second.returncode == 0, second.stderr[-3000:]
    b1, b2 = segments(read_jsonl(tmp_path / 'b' / 'train.jsonl'))
    assert {**losses(b1), **losses(b2)} == losses(read_jsonl(out / 'train.jsonl'))
    assert b2[0]['tokenizer'] == events(read_jsonl(out / 'train.jsonl'), 'run_start')[0]['tokenizer']


@pytest.mark.slow
def test_bpe_vocabulary_is_the_same_in_every_process_count(bpe_run, tmp_path):
    "Two processes under torchrun, and a prepared (memory-mapped) corpus, train the same vocabulary as one process."
    corpus, out = bpe_run
    want = events(read_jsonl(out / 'train.jsonl'), 'run_start')[0]['tokenizer']['sha256']
    from test_distributed import TINY, torchrun
    r = torchrun(['--data', str(corpus), '--max-steps', '2', '--out-dir', str(tmp_path / 'two'), *TINY,
                  '--set', 'tokenizer=bpe', '--set', 'bpe_vocab_size=300'])
    assert r.returncode == 0, r.stderr[-3000:]
    assert events(read_jsonl(tmp_path / 'two' / 'train.jsonl'), 'run_start')[0]['tokenizer']['sha256'] == want
    e = {**env(), 'TINYLM_CACHE_DIR': str(tmp_path / 'cache'), 'TINYLM_CACHE_MIN_MB': '0'}
    for _ in range(2):                                   # prepares, then reuses the cache entry
        p = subprocess.run(['tinylm_train', '--data', str(corpus), '--out-dir', str(tmp_path / 'mapped'), '--max-steps',
                            '2', '--overwrite', *tiny_args(**BPE)], capture_output=True, text=True, env=e, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        assert events(read_jsonl(tmp_path / 'mapped' / 'train.jsonl'), 'run_start')[0]['tokenizer']['sha256'] == want
    assert len(list((tmp_path / 'cache').rglob('bpe-300-*.json'))) == 1


def test_sampling_streams_whole_characters(bpe_run):
    corpus, out = bpe_run
    args = ['tinylm_sample', '--checkpoint', str(out), '--max-new-tokens', '60', '--seed', '3', '--prompt', 'Καλη']
    a = subprocess.run(args, capture_output=True, text=True, env=env(), timeout=120)
    b = subprocess.run(args, capture_output=True, text=True, env=env(), timeout=120)
    assert a.returncode == 0 and a.stderr == '', a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith('Καλη')        # the same seed, the same text; any prompt
    raw = subprocess.run(args, capture_output=True, env=env(), timeout=120).stdout
    raw.decode('utf-8')                                                 # every byte written is part of a character


def test_a_tokenizer_json_is_used_as_it_is(bpe_run, tmp_path):
    corpus, out = bpe_run
    ck = torch.load(out / 'checkpoints' / 'step_000012.pt', weights_only=True)
    (tmp_path / 'tokenizer.json').write_text(ck['tokenizer']['json'], encoding='utf-8')
    p = run_cli(['--data', corpus, '--out-dir', tmp_path / 'r', '--max-steps', 2,
                 *tiny_args(tokenizer=str(tmp_path / 'tokenizer.json'))])
    assert p.returncode == 0, p.stderr[-3000:]
    start = events(read_jsonl(tmp_path / 'r' / 'train.jsonl'), 'run_start')[0]
    assert start['tokenizer']['sha256'] == events(read_jsonl(out / 'train.jsonl'), 'run_start')[0]['tokenizer']['sha256']


@pytest.mark.parametrize('over, fragment', [
    (dict(tokenizer='bpe', bpe_vocab_size=100), "'bpe_vocab_size' must be in [257,"),
    (dict(tokenizer='bpe', bpe_vocab_size='many'), 'bpe_vocab_size'),
    (dict(tokenizer='bpee'), "(did you mean 'bpe'?)"),
    (dict(tokenizer='missing/tokenizer.json'), 'tokenizer file not found: missing/tokenizer.json'),
])
def test_bad_tokenizer_settings_are_one_clear_error(over, fragment, tmp_path):
    corpus = multibyte_corpus(tmp_path / 'c.txt')
    p = run_cli(['--data', corpus, '--out-dir', tmp_path / 'x', '--max-steps', 2, *tiny_args(**over)])
    assert_clean_error(p.returncode, p.stdout, p.stderr, 1, fragment)
    assert not (tmp_path / 'x').exists()


def test_a_corrupt_tokenizer_json_is_named(tmp_path):
    corpus = multibyte_corpus(tmp_path / 'c.txt')
    (tmp_path / 'bad.json').write_text('{"model": {"type": "BPE"', encoding='utf-8')
    p = run_cli(['--data', corpus, '--out-dir', tmp_path / 'x', *tiny_args(tokenizer=str(tmp_path / 'bad.json'))])
    assert_clean_error(p.returncode, p.stdout, p.stderr, 1, f"{tmp_path / 'bad.json'} is not a valid tokenizer.json")
    assert not (tmp_path / 'x').exists()


def test_resuming_with_another_tokenizer_is_refused(bpe_run, tmp_path):
    corpus, out = bpe_run
    before = snapshot(out)
    for over in ('tokenizer=char', 'bpe_vocab_size=400'):
        p = run_cli(['--resume', out, '--max-steps', 14, '--set', over])
        assert_clean_error(p.returncode, p.stdout, p.stderr, 1, 'when resuming')
    assert snapshot(out) == before                                     # nothing touched
