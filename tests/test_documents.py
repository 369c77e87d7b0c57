"""Corpora of documents: JSON Lines, Parquet and compressed files, an end-of-text token, the split and the packing by
document, exact resume with both packings, generation that stops where a document ends, one error line for every bad
input, and a single text file exactly as it was before documents existed."""
from __future__ import annotations
import gzip, hashlib, json, os, random, subprocess, sys
from pathlib import Path

import pytest
import torch

from conftest import (assert_clean_error, env, events, losses, make_corpus, read_jsonl, segments, tiny_args,
                      tinylm_train_exe)

DATA = Path(__file__).parent / 'data'
WORDS = ("the quick brown fox jumps over a lazy dog and cat sat on mat while bird sings song of night day rain "
         "wind river stone king queen castle sword shield light dark").split()


def make_docs(n: int, seed: int = 0, longest: int = 12, sentences: int = 4) -> list[str]:
    "`n` short documents of a few sentences each, deterministic; a document ends with a full stop, and only there."
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences_ = [' '.join(rng.choice(WORDS) for _ in range(rng.randint(1, longest)))
                      for _ in range(rng.randint(1, sentences))]
        docs.append(', '.join(s.capitalize() for s in sentences_) + '.')
    return docs


def write_docs(path: Path, docs, field: str = 'text') -> Path:
    "`docs` as the file `path` says: .jsonl, .parquet, either compressed as .gz or .zst."
    name = path.name
    if '.parquet' in name:
        import pyarrow as pa, pyarrow.parquet as pq, io
        buf = io.BytesIO()
        pq.write_table(pa.table({field: list(docs), 'n': list(range(len(docs)))}), buf, row_group_size=500)
        data = buf.getvalue()
    else:
        data = ''.join(json.dumps({'id': i, field: d}) + '\n' for i, d in enumerate(docs)).encode()
    if name.endswith('.gz'):
        data = gzip.compress(data)
    elif name.endswith('.zst'):
        import zstandard
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def cached_env(tmp_path, **extra) -> dict:
    "Every corpus goes through the cache (threshold 0 MB), a cache folder of the test's own."
    return {**env(), 'TINYLM_CACHE_DIR': str(tmp_path / 'cache'), 'TINYLM_CACHE_MIN_MB': '0', **extra}


def train(args, e=None, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([tinylm_train_exe(), *map(str, args)], capture_output=True, text=True, env=e or env(),
                          timeout=timeout)


def ok(p: subprocess.CompletedProcess):
    assert p.returncode == 0, f"rc={p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def weights_sha256(ckpt_path: Path) -> str:
    h = hashlib.sha256()
    for name, t in sorted(torch.load(ckpt_path, weights_only=True)['model'].items()):
        h.update(name.encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope='module')
def docs_file(tmp_path_factory) -> Path:
    return write_docs(tmp_path_factory.mktemp('docs') / 'docs.jsonl', make_docs(1500))


@pytest.mark.parametrize('kind', ['char', 'bpe'])
def test_a_text_corpus_is_what_it_was_before_documents(kind, tmp_path):
    """A single .txt file is one text, as before: the same token file, tokenizer and config hash as the last tinylm
    without documents (recorded in tests/data); the same losses and weights, bit for bit, on the machine kind that
    recorded them."""
    before = json.loads((DATA / 'text_corpus_before_documents.json').read_text())
    corpus = make_corpus(tmp_path / 'corpus.txt')
    extra = ['--set', 'tokenizer=bpe', '--set', 'bpe_vocab_size=300'] if kind == 'bpe' else []
    out = tmp_path / 'run'
    ok(train(['--data', corpus, '--out-dir', out, '--max-steps', 6, *tiny_args(), *extra], cached_env(tmp_path)))
    ids, = (tmp_path / 'cache').glob('*/ids-*.bin')
    want = before[kind]
    assert ids.name == want['token_file']
    assert hashlib.sha256(ids.read_bytes()).hexdigest() == want['token_file_sha256']
    assert json.loads(ids.with_suffix('.json').read_text()) == want['sidecar']
    start = read_jsonl(out / 'train.jsonl')[0]
    assert start['data_sha256'] == before['data_sha256']
    assert (start['tokenizer']['sha256'], start['vocab_size'], start['config_hash']) == \
        (want['tokenizer_sha256'], want['vocab_size'], want['config_hash'])
    assert 'corpus' not in start                                # one text: no documents to count
    ckpt = out / 'checkpoints' / 'step_000006.pt'
    if kind == 'char':
        assert torch.load(ckpt, weights_only=True)['tokenizer'] == want['tokenizer_state']
    if start['machine'] == before['machine']:
        got = {str(k): v for k, v in losses(read_jsonl(out / 'train.jsonl')).items()}
        assert got == want['losses']
        assert weights_sha256(ckpt) == want['weights_sha256']


def test_the_same_documents_in_any_format_give_one_token_file(tmp_path):
    "JSON Lines, gzipped or zstd-compressed, and Parquet: one token file and one fingerprint for the same documents."
    docs = make_docs(800, seed=3)
    shas, token_files = {}, {}
    (tmp_path / 'in').mkdir()
    for name in ('d.jsonl', 'd.jsonl.gz', 'd.jsonl.zst', 'd.parquet', 'd.parquet.zst'):
        f = write_docs(tmp_path / 'in' / name, docs)
        cache = tmp_path / f'cache_{name}'
        e = {**cached_env(tmp_path), 'TINYLM_CACHE_DIR': str(cache)}
        out = tmp_path / f'run_{name}'
        ok(train(['--data', f, '--out-dir', out, '--max-steps', 1, *tiny_args(), '--set', 'tokenizer=bpe',
                  '--set', 'bpe_vocab_size=300'], e))
        shas[name] = read_jsonl(out / 'train.jsonl')[0]['data_sha256']
        ids, = cache.glob('*/ids-*.bin')
        token_files[name] = ids.read_bytes()
    assert len(set(shas.values())) == 1, shas
    assert len(set(token_files.values())) == 1


@pytest.mark.parametrize('packing', ['stream', 'document'])
def test_documents_train_and_resume_exactly(packing, docs_file, tmp_path):
    "Both packings: a run stopped and resumed gives the straight run's losses bit for bit; run_start counts documents."
    args = [*tiny_args(sampling_cadence=0), '--set', f'packing={packing}']
    straight, parts = tmp_path / 'straight', tmp_path / 'parts'
    ok(train(['--data', docs_file, '--out-dir', straight, '--max-steps', 16, *args]))
    ok(train(['--data', docs_file, '--out-dir', parts, '--max-steps', 8, *args]))
    ok(train(['--resume', parts, '--max-steps', 16]))
    want = losses(read_jsonl(straight / 'train.jsonl'))
    first, second = segments(read_jsonl(parts / 'train.jsonl'))
    assert {**losses(first), **losses(second)} == want and sorted(want) == list(range(1, 17))
    facts = first[0]['corpus']
    assert facts['documents'] == 1500 and facts['empty_documents'] == 0 and facts['packing'] == packing
    assert 0.03 * 1500 < facts['val_documents'] < 0.07 * 1500
    assert ('kept' in facts) == (packing == 'document')
    assert first[0]['tokenizer']['vocab_size'] == len(set(''.join(make_docs(1500)))) + 1   # and the token


def test_packing_document_needs_documents(corpus, tmp_path):
    p = train(['--data', corpus, '--out-dir', tmp_path / 'run', '--max-steps', 2, *tiny_args(),
               '--set', 'packing=document'])
    assert_clean_error(p.returncode, p.stdout, p.stderr, 1, ('packing: document', 'one text'))


def test_empty_documents_are_skipped_and_counted(tmp_path):
    docs = make_docs(300)
    docs[5] = docs[77] = ''
    f = write_docs(tmp_path / 'with_empty.jsonl', docs)
    out = tmp_path / 'run'
    p = ok(train(['--data', f, '--out-dir', out, '--max-steps', 2, *tiny_args()]))
    facts = read_jsonl(out / 'train.jsonl')[0]['corpus']
    assert (facts['documents'], facts['empty_documents']) == (298, 2)
    assert '298 documents' in p.stdout and '2 empty, skipped' in p.stdout


def test_a_folder_and_a_glob_mix_formats_in_sorted_order(tmp_path):
    docs = make_docs(600, seed=5)
    folder = tmp_path / 'shards'
    folder.mkdir()
    write_docs(folder / 'b.parquet', docs[300:])
    write_docs(folder / 'a.jsonl.gz', docs[:300])
    (folder / 'README.md').write_text('not data')
    whole = write_docs(tmp_path / 'whole.jsonl', docs)
    shas = []
    for data in (folder, str(folder / '*.*'), whole):
        out = tmp_path / f'run{len(shas)}'
        ok(train(['--data', data, '--out-dir', out, '--max-steps', 1, *tiny_args()]))
        shas.append(read_jsonl(out / 'train.jsonl')[0]['data_sha256'])
    assert shas[0] == shas[1] == shas[2]


def _bad_inputs(d: Path) -> dict:
    "name -> (the --data path, what the error must say)"
    import pyarrow as pa, pyarrow.parquet as pq, zstandard
    good = ''.join(json.dumps({'text': s}) + '\n' for s in make_docs(50)).encode()
    cases = {}
    def jl(name, body, *say):
        (d / name).write_bytes(body)
        cases[name] = (d / name, (str(d / name), *say))
    jl('not_json.jsonl', good + b'{"text": "unfinished\n', 'line 51', 'not valid JSON')
    jl('not_object.jsonl', good + b'["a", "list"]\n', 'line 51', 'a JSON array, not an object')
    jl('no_field.jsonl', good + b'{"body": "x", "id": 3}\n', 'line 51', "no 'text' field", "'body', 'id'",
       '--set text_field=NAME')
    jl('not_string.jsonl', good + b'{"text": 42}\n', 'line 51', "'text' field is a JSON number, not a string")
    jl('truncated.jsonl.gz', gzip.compress(good * 40)[:-100], 'truncated or is not valid gzip')
    jl('truncated.jsonl.zst', zstandard.ZstdCompressor().compress(good * 40)[:-20], 'truncated')
    jl('table.csv', b'text\nhello\n', "does not read .csv", "'.jsonl' or '.parquet'")
    pq.write_table(pa.table({'body': ['a', 'b']}), d / 'no_column.parquet')
    cases['no_column.parquet'] = (d / 'no_column.parquet', ("no column 'text'", "'body'"))
    pq.write_table(pa.table({'text': [1.5, 2.5]}), d / 'numbers.parquet')
    cases['numbers.parquet'] = (d / 'numbers.parquet', ("column 'text' holds double, not strings",))
    (d / 'empty_folder').mkdir()
    (d / 'empty_folder' / 'notes.md').write_text('nothing to read')
    cases['empty_folder'] = (d / 'empty_folder', ('holds no *.txt files, nor other files tinylm reads',))
    return cases


BAD = ['not_json.jsonl', 'not_object.jsonl', 'no_field.jsonl', 'not_string.jsonl', 'truncated.jsonl.gz',
       'truncated.jsonl.zst', 'table.csv', 'no_column.parquet', 'numbers.parquet', 'empty_folder']


@pytest.mark.parametrize('case', BAD)
def test_bad_input_is_one_error_line_and_leaves_nothing_in_the_cache(case, tmp_path):
    data, say = _bad_inputs(tmp_path)[case]
    for threshold in ('0', '32'):                    # prepared into the cache, and in memory
        e = cached_env(tmp_path, TINYLM_CACHE_MIN_MB=threshold)
        p = train(['--data', data, '--out-dir', tmp_path / f'run{threshold}', '--max-steps', 2, *tiny_args()], e)
        assert_clean_error(p.returncode, p.stdout, p.stderr, 1, say)
        left = [q for q in (tmp_path / 'cache').rglob('*') if q.is_file()] if (tmp_path / 'cache').exists() else []
        assert not left, left                        # nothing half-written: no scan, no token file, no temporary
        assert not (tmp_path / f'run{threshold}' / 'checkpoints').exists()


def test_a_tokenizer_without_the_end_of_text_token_is_refused_for_documents(corpus, docs_file, tmp_path):
    "A run on a text, resumed on documents; a tokenizer.json without the token: both say how to get one that has it."
    out = tmp_path / 'text_run'
    ok(train(['--data', corpus, '--out-dir', out, '--max-steps', 2, *tiny_args()]))
    p = train(['--resume', out, '--max-steps', 4, '--data', docs_file, '--allow-data-change'])
    assert_clean_error(p.returncode, p.stdout, p.stderr, 1, ('end-of-text token', 'Train a new one on these documents'))
    from tinylm.bpe import BPETokenizer
    tok_file = tmp_path / 'tokenizer.json'
    tok_file.write_text(BPETokenizer.train(corpus.read_text(), 300).json)
    p = train(['--data', docs_file, '--out-dir', tmp_path / 'r2', '--max-steps', 2, *tiny_args(),
               '--set', f'tokenizer={tok_file}'])
    assert_clean_error(p.returncode, p.stdout, p.stderr, 1, ('end-of-text token', 'tokenizer.json that has'))


@pytest.fixture(scope='module')
def ending_model(tmp_path_factory):
    "A tiny model trained on short documents that end with a full stop (and have none elsewhere)."
    d = tmp_path_factory.mktemp('ending')
    f = write_docs(d / 'docs.jsonl', make_docs(3000, seed=11, longest=2, sentences=1))   # 'Queen castle.' and such
    out = d / 'run'
    ok(train(['--data', f, '--out-dir', out, '--max-steps', 150,
              *tiny_args(dropout=0.0, sampling_cadence=0, eval_cadence=50, checkpoint_cadence=150,
                         lr_decay_steps=150, learning_rate=1e-2, min_lr=1e-3)]))
    return out


def test_samples_stop_at_the_end_of_a_document(ending_model):
    sample = [sys.executable, '-m', 'tinylm.sample', '--checkpoint', str(ending_model), '--device', 'cpu',
              '--temperature', '0.3', '--max-new-tokens', '300']
    stopped = subprocess.run(sample + ['--num-samples', '3'], capture_output=True, text=True, env=env())
    assert stopped.returncode == 0, stopped.stderr
    texts = stopped.stdout.split('\n' + '-' * 15 + '\n')
    assert len(texts) == 3 and all(t.rstrip('\n').endswith('.') for t in texts), texts
    assert all(len(t) < 300 for t in texts) and '<|endoftext|>' not in stopped.stdout
    on = subprocess.run(sample + ['--no-stop', '--prompt', 'The'], capture_output=True, text=True, env=env())
    assert on.returncode == 0 and on.stdout.startswith('The'), on.stderr
    assert '.\n<|endoftext|>\n' in on.stdout                     # past the end: the boundary shown, and on
    run_samples = events(read_jsonl(ending_model / 'train.jsonl'), 'sample')   # the run's own, at its end
    assert run_samples and all(r['sample_text'].endswith('.') for r in run_samples), run_samples


def test_an_exported_model_stops_at_the_end_of_a_document_in_transformers(ending_model, tmp_path):
    pytest.importorskip('transformers')
    hf = tmp_path / 'hf'
    p = subprocess.run([sys.executable, '-m', 'tinylm.interop', str(ending_model), str(hf)], capture_output=True,
                       text=True, env=env())
    assert p.returncode == 0, p.stderr
    cfg = json.loads((hf / 'config.json').read_text())
    gen = json.loads((hf / 'generation_config.json').read_text())
    eot = cfg['eos_token_id']
    assert eot == cfg['bos_token_id'] == gen['eos_token_id'] == gen['bos_token_id'] == cfg['vocab_size'] - 1
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(hf)
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    assert tok.eos_token == '<|endoftext|>' and tok.eos_token_id == eot
    ids = torch.tensor([[eot, *tok('The', add_special_tokens=False)['input_ids']]])
    room = cfg['n_positions'] - ids.shape[1]                      # learned positions: no further than the context
    out = model.generate(ids, max_new_tokens=room, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    assert new[-1] == eot and len(new) < room, new                # transformers stopped at the document's end
    assert tok.decode(new[:-1]).endswith('.')


@pytest.mark.slow
def test_a_200_mb_json_lines_corpus_trains_with_both_packings_and_resumes_exactly(tmp_path):
    "Generated here: 200 MB of short documents, prepared once into the cache, then both packings resume exactly."
    rng = random.Random(7)
    pool = make_docs(5000, seed=7)
    f = tmp_path / 'big.jsonl'
    with f.open('w', encoding='utf-8') as out:
        size = 0
        while size < 200 * 2**20:
            line = json.dumps({'text': ' '.join(rng.sample(pool, 3))}) + '\n'
            out.write(line)
            size += len(line)
    e = cached_env(tmp_path)
    for packing in ('stream', 'document'):
        args = ['--data', f, *tiny_args(sampling_cadence=0, eval_batches=1), '--set', f'packing={packing}']
        straight, parts = tmp_path / f'straight_{packing}', tmp_path / f'parts_{packing}'
        ok(train([*args, '--out-dir', straight, '--max-steps', 8], e, timeout=900))
        ok(train([*args, '--out-dir', parts, '--max-steps', 4], e, timeout=900))
        ok(train(['--resume', parts, '--max-steps', 8], e, timeout=900))
        first, second = segments(read_jsonl(parts / 'train.jsonl'))
        assert {**losses(first), **losses(second)} == losses(read_jsonl(straight / 'train.jsonl'))
        assert first[0]['corpus']['documents'] > 300_000
    entries = list((tmp_path / 'cache').iterdir())
    assert len(entries) == 1 and len(list(entries[0].glob('ids-*.bin'))) == 1   # prepared once for both


@pytest.mark.slow
@pytest.mark.parametrize('packing', ['stream', 'document'])
def test_documents_resume_exactly_under_torchrun(packing, docs_file, tmp_path):
    "Two gloo processes: a run stopped and resumed gives the straight run's losses bit for bit, with both packings."
    from test_distributed import torchrun
    args = ['--data', str(docs_file), *map(str, tiny_args(sampling_cadence=0)), '--set', f'packing={packing}']
    straight, parts = tmp_path / 'straight', tmp_path / 'parts'
    for argv in (['--out-dir', str(straight), '--max-steps', '12', *args],
                 ['--out-dir', str(parts), '--max-steps', '6', *args],
                 ['--resume', str(parts), '--max-steps', '12']):
        p = torchrun(argv, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
    first, second = segments(read_jsonl(parts / 'train.jsonl'))
    assert {**losses(first), **losses(second)} == losses(read_jsonl(straight / 'train.jsonl'))
    assert first[0]['world_size'] == 2 and first[0]['corpus']['packing'] == packing
