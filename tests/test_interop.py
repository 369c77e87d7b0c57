"""Models that leave tinylm and come back (issue 18): `tinylm_export` folders that `transformers` loads with the same
logits, ids and greedy text; `tinylm_train --init-from` a tinylm run, an exported folder or a GPT-2 folder made on the
spot, with exact resume; both round trips; every bad source refused with one `error:` line and nothing written.
Nothing is downloaded: every Hugging Face model here is built locally."""
from __future__ import annotations
import contextlib, io, json, shutil, subprocess, sys
from pathlib import Path

import pytest
import torch

from conftest import Run, cli_run, run_cli, env, events, losses, assert_clean_error, tiny_args, read_jsonl

import transformers   # the dev extra installs the hf extra: a missing one fails here, never skips
from safetensors.torch import load_file
from tinylm.sample import load_model
from tinylm.main import weights_sha256

TEXT = "The quick fox,\n  the lazy dog.\n\nKing: queen!"


def in_process(main, *args):
    "(status, stdout, stderr) of a command's `main(argv)` run in this process (transformers is imported once)."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def train(*args, ok: bool = True):
    "`tinylm_train ARGS` in this process, with the tiny config."
    from tinylm.main import main
    r = in_process(main, *tiny_args(), *args)   # the tiny config first: ARGS may change it
    if ok: assert r[0] == 0, r[2]
    return r


def export_cli(*args) -> subprocess.CompletedProcess:
    "`tinylm_export ARGS` (the console script, or `python -m tinylm.interop` where it is not installed)."
    exe = shutil.which('tinylm_export')
    cmd = [exe] if exe else [sys.executable, '-m', 'tinylm.interop']
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, env=env(), timeout=120)


def export_ok(ckpt, out) -> Path:
    from tinylm.interop import main
    code, _, err = in_process(main, ckpt, out)
    assert code == 0, err
    return Path(out)


def logits_diff(model, hf, ids) -> float:
    with torch.no_grad(): return (model(ids)[0] - hf(ids).logits).abs().max().item()


RECIPES = {'nanogpt-char': [], 'modern-char': ['--config', 'modern'],
           'nanogpt-bpe': ['--set', 'tokenizer=bpe', '--set', 'bpe_vocab_size=300']}


@pytest.fixture(scope='module', params=list(RECIPES))
def trained(request, tmp_path_factory, corpus):
    "A tiny run of each recipe and tokenizer kind (8 steps: its weights are no longer at their initial values)."
    out = tmp_path_factory.mktemp(request.param) / 'run'
    cli_run(out, corpus, 8, *RECIPES[request.param])
    return request.param, out


def test_export_loads_in_transformers_with_the_same_logits_ids_and_greedy_text(trained, tmp_path):
    name, run = trained
    hf_dir = export_ok(run, tmp_path / 'hf')
    assert {'config.json', 'model.safetensors', 'generation_config.json', 'tokenizer.json',
            'tokenizer_config.json'} <= {p.name for p in hf_dir.iterdir()}
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(hf).__name__ == ('ApertusForCausalLM' if name.startswith('modern') else 'GPT2LMHeadModel')
    model, tok, _ = load_model(run, 'cpu')
    ids = torch.randint(0, tok.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    assert logits_diff(model, hf, ids) < 1e-4
    auto = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert auto(TEXT)['input_ids'] == tok.encode(TEXT).tolist()
    prompt = 'The king'
    from tinylm.sample import main as sample
    code, text, err = in_process(sample, '--checkpoint', run, '--top-k', 1, '--prompt', prompt, '--max-new-tokens', 20,
                                 '--device', 'cpu')
    assert code == 0, err
    out = hf.generate(**auto(prompt, return_tensors='pt'), do_sample=False, max_new_tokens=20, use_cache=True)
    assert auto.decode(out[0]) + '\n' == text and len(text) > len(prompt) + 5
    assert_cached_greedy_is_plain_greedy(model, tok)


def assert_cached_greedy_is_plain_greedy(model, tok):
    "The KV-cache engine's greedy tokens are the plain loop's, within the context and three contexts beyond it."
    ids = torch.as_tensor(tok.encode(TEXT[:20]), dtype=torch.long)[None]
    n = 3 * model.block_size
    assert torch.equal(model.generate(ids, n, top_k=1), model.generate(ids, n, top_k=1, cache=False))


@pytest.fixture(scope='module')
def src(tmp_path_factory, corpus) -> Path:
    "One tiny character run of the nanoGPT recipe (8 steps) that several tests start from."
    return cli_run(tmp_path_factory.mktemp('src') / 'run', corpus, 8).out


def test_init_from_resumes_bit_identically_and_records_its_source(src, tmp_path, corpus):
    src = Run(src).reload()
    ckpt = sorted((src.out / 'checkpoints').glob('step_*.pt'))[-1]
    straight = cli_run(tmp_path / 'straight', corpus, 12, '--init-from', ckpt)
    part = cli_run(tmp_path / 'part', corpus, 6, '--init-from', ckpt, checkpoint_cadence=6)
    p = run_cli(['--resume', part.out, '--max-steps', 12])
    assert p.returncode == 0, p.stderr
    part.reload()
    assert losses(part.records) == losses(straight.records) and len(losses(straight.records)) == 12
    a, b = (torch.load(r.out / 'checkpoints/step_000012.pt', weights_only=True)['model'] for r in (straight, part))
    assert all(torch.equal(a[k], b[k]) for k in a)
    source_sha = weights_sha256(torch.load(ckpt, weights_only=True)['model'])
    starts = events(part.records, 'run_start')
    assert [s['step'] for s in starts] == [0, 6]
    for s in starts:   # the resumed run says where its weights came from too
        assert s['init_from'] == {'path': str(ckpt), 'kind': 'tinylm', 'sha256': source_sha}
    assert events(src.records, 'run_start')[0]['init_from'] is None
    assert events(straight.records, 'step')[0]['loss'] < events(src.records, 'step')[0]['loss']   # not from scratch


NEGLIGIBLE = ['--set', 'learning_rate=1e-30', '--set', 'min_lr=0', '--set', 'muon_lr=1e-30']


def test_round_trip_export_init_from_export_gives_the_same_tensors(trained, tmp_path, corpus):
    recipe, run = trained
    first = export_ok(run, tmp_path / 'hf1')
    train('--init-from', first, '--data', corpus, '--out-dir', tmp_path / 'again', '--max-steps', 1, *NEGLIGIBLE)
    start = events(read_jsonl(tmp_path / 'again/train.jsonl'), 'run_start')[0]
    assert start['init_from']['kind'] == ('apertus' if recipe.startswith('modern') else 'gpt2')
    assert start['init_from']['sha256'] == weights_sha256(load_model(run, 'cpu')[0].state_dict())
    second = export_ok(tmp_path / 'again', tmp_path / 'hf2')
    t1, t2 = load_file(first / 'model.safetensors'), load_file(second / 'model.safetensors')
    assert set(t1) == set(t2) and all(torch.equal(t1[k], t2[k]) for k in t1)
    assert (first / 'tokenizer.json').read_bytes() == (second / 'tokenizer.json').read_bytes()


def make_gpt2(folder: Path, corpus: Path) -> Path:
    "A GPT-2 folder made on the spot: GPT-2's own tanh GELU, biases everywhere (not zero), a byte-level BPE."
    from tinylm.bpe import BPETokenizer, text_pieces
    from tinylm.interop import write_tokenizer
    bpe = BPETokenizer.train(text_pieces(corpus.read_text(encoding='utf-8')), 300)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=bpe.vocab_size, n_positions=32, n_embd=32, n_layer=1, n_head=2,
                                  bos_token_id=None, eos_token_id=None)
    assert cfg.activation_function == 'gelu_new'
    gpt2 = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for n, p in gpt2.named_parameters():
            if n.endswith('.bias'): p.normal_(0, 0.05)
    gpt2.save_pretrained(folder)
    write_tokenizer(bpe, folder)
    return folder


def test_round_trip_from_a_gpt2_folder_gives_back_its_logits(tmp_path, corpus):
    gpt2_dir = make_gpt2(tmp_path / 'gpt2', corpus)
    train('--init-from', gpt2_dir, '--data', corpus, '--out-dir', tmp_path / 'tuned', '--max-steps', 1, *NEGLIGIBLE)
    cfg = events(read_jsonl(tmp_path / 'tuned/train.jsonl'), 'run_start')[0]['config']
    assert (cfg['activation'], cfg['bias'], cfg['tokenizer'], cfg['block_size']) == ('gelu_tanh', True, 'bpe', 32)
    back = export_ok(tmp_path / 'tuned', tmp_path / 'back')
    original = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    exported = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    ids = torch.randint(0, original.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(): assert (original(ids).logits - exported(ids).logits).abs().max().item() < 1e-4
    assert_cached_greedy_is_plain_greedy(*load_model(tmp_path / 'tuned', 'cpu')[:2])


def test_bad_sources_are_one_error_line_and_nothing_is_written(tmp_path, corpus):
    gpt2_dir = make_gpt2(tmp_path / 'gpt2', corpus)
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'file.txt').write_text('not a model')
    llama = tmp_path / 'llama'
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   vocab_size=300)
    transformers.LlamaForCausalLM(cfg).save_pretrained(llama)
    shutil.copy(gpt2_dir / 'tokenizer.json', llama)
    unfit = shutil.copytree(gpt2_dir, tmp_path / 'unfit')
    (unfit / 'config.json').write_text(json.dumps({**json.loads((unfit / 'config.json').read_text()), 'n_embd': 64}))
    no_tok = shutil.copytree(gpt2_dir, tmp_path / 'no_tok')
    (no_tok / 'tokenizer.json').unlink()
    cases = [(tmp_path / 'missing', 'not found'), (tmp_path / 'file.txt', 'file.txt'),
             (tmp_path / 'empty', 'no config.json'), (llama, 'LlamaForCausalLM, which tinylm cannot load'),
             (unfit, 'the weights do not fit their config'), (no_tok, 'has no tokenizer')]
    for i, (source, message) in enumerate(cases):
        out = tmp_path / f'out{i}'
        if i < 2:   # through the console script, as people meet it
            p = run_cli(['--init-from', source, '--data', corpus, '--out-dir', out, '--max-steps', 2])
            code, stdout, stderr = p.returncode, p.stdout, p.stderr
        else: code, stdout, stderr = train('--init-from', source, '--data', corpus, '--out-dir', out, '--max-steps', 2,
                                           ok=False)
        line = assert_clean_error(code, stdout, stderr, contains=message)
        assert line.startswith('error: --init-from'), line
        assert not out.exists(), f"{source}: {out} was created"


def test_the_shape_comes_from_the_source_and_the_vocabulary_must_cover_the_corpus(src, tmp_path, corpus):
    r = train('--init-from', src, '--data', corpus, '--out-dir', tmp_path / 'a', '--set', 'n_layer=3', ok=False)
    assert_clean_error(*r, contains='its model has n_layer=1, but n_layer=3 is set on the command line')
    r = train('--init-from', src, '--resume', src, ok=False)
    assert_clean_error(*r, contains='cannot be combined with --resume')
    other = tmp_path / 'other.txt'
    other.write_text(corpus.read_text() + 'Zoë, naïve café §\n')
    r = train('--init-from', src, '--data', other, '--out-dir', tmp_path / 'b', ok=False)
    assert_clean_error(*r, contains=("'§' (U+00A7)", "'é' (U+00E9)", 'lacks'))
    assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()


def test_export_refuses_options_without_an_exact_equivalent(src, tmp_path, corpus):
    train('--data', corpus, '--out-dir', tmp_path / 'run', '--max-steps', 1, '--set', 'norm=rmsnorm')
    p = export_cli(tmp_path / 'run', tmp_path / 'hf')   # the console script
    assert_clean_error(p.returncode, p.stdout, p.stderr, contains='cannot export norm: rmsnorm with pos_emb: learned')
    assert not (tmp_path / 'hf').exists()
    from tinylm.interop import main
    (tmp_path / 'full').mkdir(); (tmp_path / 'full' / 'x').write_text('x')
    assert_clean_error(*in_process(main, src, tmp_path / 'full'), contains='is not empty')
    assert [p.name for p in (tmp_path / 'full').iterdir()] == ['x']


def test_without_the_extra_training_works_and_hf_folders_name_the_extra(src, tmp_path, corpus):
    "A `transformers` that cannot be imported, as on a machine without the extra."
    block = tmp_path / 'block' / 'transformers'
    block.mkdir(parents=True)
    (block / '__init__.py').write_text("raise ImportError('No module named transformers', name='transformers')\n")
    e = {**env(), 'PYTHONPATH': f"{block.parent}:{env().get('PYTHONPATH', '')}"}
    blocked = lambda *a: subprocess.run(['tinylm_train', *map(str, a)], capture_output=True, text=True, env=e,
                                        timeout=120)
    p = blocked('--data', corpus, '--out-dir', tmp_path / 'plain', '--max-steps', 1, *tiny_args())
    assert p.returncode == 0, p.stderr
    hf_dir = export_ok(src, tmp_path / 'hf')
    p = blocked('--init-from', hf_dir, '--data', corpus, '--out-dir', tmp_path / 'x', '--max-steps', 1)
    assert_clean_error(p.returncode, p.stdout, p.stderr, contains=('needs the hf extra', 'pip install -e ".[hf]"'))
    p = subprocess.run([sys.executable, '-m', 'tinylm.interop', str(src), str(tmp_path / 'hf2')], capture_output=True,
                       text=True, env=e, timeout=120)
    assert_clean_error(p.returncode, p.stdout, p.stderr, contains='needs the hf extra')
    assert not (tmp_path / 'hf2').exists()


@pytest.mark.slow   # torchrun: the slow set
def test_init_from_under_torchrun_matches_one_process(src, tmp_path, corpus):
    "Two processes started from an exported folder train what one process trains, and log the source once."
    from test_distributed import TINY, torchrun, single
    hf_dir = export_ok(src, tmp_path / 'hf')
    args = ['--init-from', str(hf_dir), '--data', str(corpus), '--max-steps', '4', *TINY]
    two = torchrun([*args, '--out-dir', str(tmp_path / 'two')])
    one = single([*args, '--out-dir', str(tmp_path / 'one')])
    assert two.returncode == 0 and one.returncode == 0, (two.stderr[-2000:], one.stderr[-2000:])
    a, b = (read_jsonl(tmp_path / d / 'train.jsonl') for d in ('one', 'two'))
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4] and max(abs(la[s] - lb[s]) / la[s] for s in la) < 1e-5
    starts = events(b, 'run_start')
    assert len(starts) == 1 and starts[0]['world_size'] == 2
    assert starts[0]['init_from'] == events(a, 'run_start')[0]['init_from'] and starts[0]['init_from']['kind'] == 'gpt2'


def test_an_older_gpt2_folder_with_vocab_and_merges_reads_its_tokenizer(tmp_path, corpus):
    "No tokenizer.json, only GPT-2's vocab.json and merges.txt: transformers converts them (and adds <|endoftext|>)."
    from tokenizers import Tokenizer as HFTokenizer
    from tinylm.bpe import BPETokenizer, text_pieces
    from tinylm.interop import read_hf
    bpe = BPETokenizer.train(text_pieces(corpus.read_text(encoding='utf-8')), 300)
    cfg = transformers.GPT2Config(vocab_size=301, n_positions=32, n_embd=32, n_layer=1, n_head=2, bos_token_id=None,
                                  eos_token_id=None)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    HFTokenizer.from_str(bpe.json).model.save(str(tmp_path))
    assert not (tmp_path / 'tokenizer.json').exists() and (tmp_path / 'merges.txt').exists()
    tok = read_hf(tmp_path).tokenizer
    assert tok.vocab_size == 301 and tok.encode(TEXT).tolist() == bpe.encode(TEXT).tolist()
    assert tok.decode(tok.encode(TEXT)) == TEXT
