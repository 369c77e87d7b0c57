"""The modern recipe end to end: bundled recipes by name, Muon + AdamW with every model option, exact resume with
dropout on, DDP equal to one process, torch.compile, and the whole-split evaluation in bits per character."""
from __future__ import annotations
import pytest
import json, math, shutil
from pathlib import Path

import torch

from conftest import assert_clean_error, events, losses, make_corpus, read_jsonl, run_cli, segments, tiny_args

# the tiny model with every modern option on
MODERN = dict(optimizer='muon', pos_emb='rope', norm='rmsnorm', qk_norm='true', activation='relu2',
              tie_embeddings='false', zero_init='true', muon_lr=0.02, lr_schedule='wsd', decay_fraction=0.5,
              min_lr=0.0)


def test_bundled_recipes_by_name(corpus, tmp_path):
    help_text = run_cli(['--help']).stdout
    assert 'Bundled recipes (--config NAME): modern, modern_bpe, nanogpt, speedrun' in help_text
    out = tmp_path / 'modern'
    p = run_cli(['--config', 'modern', '--data', corpus, '--out-dir', out, '--max-steps', 3,
                 '--set', 'eval_batches=2', '--set', 'sample_length=10', '--set', 'compile=false', '--set', 'threads=1'])
    assert p.returncode == 0, p.stderr[-3000:]
    config = read_jsonl(out / 'train.jsonl')[0]['config']
    assert config['optimizer'] == 'muon' and config['pos_emb'] == 'rope' and config['n_embd'] == 128
    assert config['max_steps'] == 3 and config['eval_batches'] == 2     # the flags apply on top of the recipe
    p = run_cli(['--config', 'moden', '--data', corpus, '--out-dir', tmp_path / 'x'])
    assert_clean_error(p.returncode, p.stdout, p.stderr, 1, ("'moden' is neither a file nor a bundled recipe",
                                                              'bundled recipes: modern, modern_bpe, nanogpt, speedrun'))


def test_muon_run_resumes_bit_identically(corpus, tmp_path):
    "Muon's momentum buffers and AdamW's moments both travel in the checkpoint: 12 straight == 6 + resume + 6."
    straight = run_cli(['--data', corpus, '--out-dir', tmp_path / 'a', '--max-steps', 12, *tiny_args(**MODERN)])
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = run_cli(['--data', corpus, '--out-dir', tmp_path / 'b', '--max-steps', 6, *tiny_args(**MODERN)])
    assert first.returncode == 0, first.stderr[-3000:]
    ck = torch.load(tmp_path / 'b' / 'checkpoints' / 'step_000006.pt', weights_only=True)
    assert set(ck['optimizer']) == {'muon', 'adamw'} and ck['optimizer']['muon']['state']
    second = run_cli(['--resume', tmp_path / 'b', '--max-steps', 12])
    assert second.returncode == 0, second.stderr[-3000:]
    a = losses(read_jsonl(tmp_path / 'a' / 'train.jsonl'))
    b1, b2 = segments(read_jsonl(tmp_path / 'b' / 'train.jsonl'))
    assert sorted(a) == list(range(1, 13))
    assert {**losses(b1), **losses(b2)} == a, "the resumed Muon run is not the straight run"



def test_speedrun_options_resume_bit_identically(corpus, tmp_path):
    "Every speedrun option on (their gates, tables and NorMuon's second moments travel in the checkpoint): 8 == 4 + 4."
    opts = dict(MODERN, logit_softcap=15.0, value_embeds='true', x0_skip='true', smear='true', bigram_buckets=64,
                normuon='true')
    straight = run_cli(['--data', corpus, '--out-dir', tmp_path / 'a', '--max-steps', 8, *tiny_args(**opts)])
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = run_cli(['--data', corpus, '--out-dir', tmp_path / 'b', '--max-steps', 4, *tiny_args(**opts)])
    assert first.returncode == 0, first.stderr[-3000:]
    ck = torch.load(tmp_path / 'b' / 'checkpoints' / 'step_000004.pt', weights_only=True)
    assert {'value_emb.weight', 'bigram_emb.weight', 'smear_gate', 'smear_lambda'} <= set(ck['model'])
    assert any('neuron_second_moment' in s for s in ck['optimizer']['muon']['state'].values())
    second = run_cli(['--resume', tmp_path / 'b', '--max-steps', 8])
    assert second.returncode == 0, second.stderr[-3000:]
    a = losses(read_jsonl(tmp_path / 'a' / 'train.jsonl'))
    b1, b2 = segments(read_jsonl(tmp_path / 'b' / 'train.jsonl'))
    assert sorted(a) == list(range(1, 9)) and {**losses(b1), **losses(b2)} == a
    plain = run_cli(['--data', corpus, '--out-dir', tmp_path / 'c', '--max-steps', 8, *tiny_args(**MODERN)])
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert losses(read_jsonl(tmp_path / 'c' / 'train.jsonl')) != a, "the options changed nothing"

@pytest.mark.slow
def test_muon_under_torchrun_equals_one_process(corpus, tmp_path):
    from test_distributed import TINY, torchrun, single, losses as dlosses
    modern = [x for k, v in MODERN.items() for x in ('--set', f'{k}={v}')]
    r = torchrun(['--data', str(corpus), '--max-steps', '8', '--out-dir', str(tmp_path / 'two'), *TINY, *modern])
    assert r.returncode == 0, r.stderr[-3000:]
    r = single(['--data', str(corpus), '--max-steps', '8', '--out-dir', str(tmp_path / 'one'), *TINY, *modern])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = dlosses(tmp_path / 'one'), dlosses(tmp_path / 'two')
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert max(abs(a[s] - b[s]) / a[s] for s in a) < 1e-4


@pytest.mark.slow
def test_muon_with_compile(corpus, tmp_path):
    p = run_cli(['--data', corpus, '--out-dir', tmp_path / 'c', '--max-steps', 4, *tiny_args(**MODERN, compile='true')],
                timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ck = torch.load(tmp_path / 'c' / 'checkpoints' / 'step_000004.pt', weights_only=True)
    assert not any(k.startswith('_orig_mod.') for k in ck['model']) and set(ck['optimizer']) == {'muon', 'adamw'}


def test_whole_split_evaluation_in_bits_per_character(corpus, tmp_path):
    "eval_batches: 0 predicts every character of the validation split once; every eval record carries val_bpc and"
    "val_bpb (equal, on ASCII text)."
    out = tmp_path / 'whole'
    p = run_cli(['--data', corpus, '--out-dir', out, '--max-steps', 4, *tiny_args(eval_batches=0)])
    assert p.returncode == 0, p.stderr[-3000:]
    evals = [r for r in read_jsonl(out / 'train.jsonl') if r['event'] == 'eval']
    assert evals and all(r['val_bpc'] == r['val_loss'] / math.log(2) == r['val_bpb'] for r in evals)
    assert 'bpb' in p.stdout
    # the same number, recomputed by hand from the checkpoint: the mean loss over all non-overlapping windows
    from tinylm.checkpoint import load_checkpoint, model_from_checkpoint
    from tinylm.data import split_corpus
    ck = load_checkpoint(out)
    model, tok, cfg = model_from_checkpoint(ck)
    _, val = split_corpus(tok.encode(corpus.read_text(encoding='utf-8')), cfg.val_fraction)
    val = torch.from_numpy(val.astype('int64'))
    T, total, n = cfg.block_size, 0.0, 0
    model.eval()
    with torch.no_grad():
        for s in range(0, len(val) - T, T):
            _, loss = model(val[s:s + T][None], val[s + 1:s + T + 1][None])
            total += loss.item() * T; n += T
    assert abs(evals[-1]['val_loss'] - total / n) < 1e-5, (evals[-1]['val_loss'], total / n)


DATA = Path(__file__).parent / 'data'


def test_muon_ns_dtype_is_logged_and_a_resume_may_choose_another(corpus, tmp_path):
    "run_start names the Newton–Schulz dtype; a resume in another dtype continues and says which one was saved."
    from tinylm.optim import muon_ns_dtype
    auto = str(muon_ns_dtype('auto', 'cpu')).replace('torch.', '')
    first = run_cli(['--data', corpus, '--out-dir', tmp_path / 'r', '--max-steps', 4, *tiny_args(**MODERN)])
    assert first.returncode == 0, first.stderr[-3000:]
    other = 'float32' if auto == 'bfloat16' else 'bfloat16'
    second = run_cli(['--resume', tmp_path / 'r', '--max-steps', 6, '--set', f'muon_ns_dtype={other}'])
    assert second.returncode == 0, second.stderr[-3000:]
    starts = events(read_jsonl(tmp_path / 'r' / 'train.jsonl'), 'run_start')
    assert starts[0]['muon_ns_dtype'] == auto and 'muon_ns_dtype_saved' not in starts[0]
    assert starts[0]['cpu_capability'] == torch.backends.cpu.get_cpu_capability()
    assert f'muon ({auto} Newton–Schulz' in starts[0]['optimizer']
    assert (starts[1]['muon_ns_dtype'], starts[1]['muon_ns_dtype_saved']) == (other, auto)
    assert sorted(losses(read_jsonl(tmp_path / 'r' / 'train.jsonl'))) == list(range(1, 7))
    p = run_cli(['--data', corpus, '--out-dir', tmp_path / 'x', *tiny_args(**MODERN, muon_ns_dtype='fp16')])
    assert_clean_error(p.returncode, p.stdout, p.stderr, 1, "'muon_ns_dtype' must be one of auto, float32, bfloat16")
    p = run_cli(['--data', corpus, '--out-dir', tmp_path / 'x', *tiny_args(**MODERN, muon_ns_steps=0)])
    assert_clean_error(p.returncode, p.stdout, p.stderr, 1, "'muon_ns_steps' must be in [1, 50], got 0")


def test_a_checkpoint_of_tinylm_0_1_0_resumes_exactly(tmp_path):
    """A Muon checkpoint written by tinylm 0.1.0 (torch.optim.Muon, bfloat16) continues as that version would have:
    bit for bit on the kind of machine it was recorded on (`machine_kind`: torch, ATen capability, oneDNN's ISA,
    threads), within float noise on another."""
    recorded = json.loads((DATA / 'muon_v0.1.0.json').read_text())
    run = tmp_path / 'old'
    (run / 'checkpoints').mkdir(parents=True)
    shutil.copy(DATA / 'muon_v0.1.0_step6.pt', run / 'checkpoints' / 'step_000006.pt')
    corpus = make_corpus(tmp_path / 'corpus.txt')       # the corpus it was trained on (make_corpus is deterministic)
    p = run_cli(['--resume', run, '--max-steps', 12, '--data', corpus, '--set', 'muon_ns_dtype=bfloat16'])
    assert p.returncode == 0, p.stderr[-3000:]
    got = {str(k): v for k, v in losses(read_jsonl(run / 'train.jsonl')).items()}
    want = {k: v for k, v in recorded['straight_losses'].items() if int(k) > 6}
    assert sorted(got, key=int) == sorted(want, key=int)
    start = events(read_jsonl(run / 'train.jsonl'), 'run_start')[0]
    if same_kind(start['machine'], recorded['machine']):
        assert got == want, f"tinylm 0.1.0's Muon run does not continue bit for bit on its own kind of machine"
    else:   # measured held to AVX2 (ATen and oneDNN): at most 7.8e-6 relative over steps 7..12; 1e-4 leaves room
        assert all(abs(got[k] - want[k]) <= 1e-4 * want[k] for k in want), (got, want)
    assert start['muon_ns_dtype'] == 'bfloat16' and 'muon_ns_dtype_saved' not in start
    assert start['machine_saved'] is None and 'another kind of machine (unknown' in p.stdout   # 0.1.0 recorded none


def same_kind(here: dict, recorded: dict) -> bool:
    "Whether a run computed `here` must equal one recorded on `recorded` bit for bit: every field of the kind agrees."
    return here == recorded


def test_kind_of_machine_is_recorded_and_a_resume_across_kinds_says_so(corpus, tmp_path):
    "Every checkpoint and run_start names its machine kind; a resume with another thread count is another kind."
    from tinylm.device import machine_kind
    first = run_cli(['--data', corpus, '--out-dir', tmp_path / 'k', '--max-steps', 4, *tiny_args()])
    assert first.returncode == 0, first.stderr[-3000:]
    here = {**machine_kind('cpu'), 'threads': 1}
    assert torch.load(tmp_path / 'k' / 'checkpoints' / 'step_000004.pt', weights_only=True)['machine'] == here
    same = run_cli(['--resume', tmp_path / 'k', '--max-steps', 6])
    assert same.returncode == 0 and 'another kind of machine' not in same.stdout, same.stderr[-3000:]
    other = run_cli(['--resume', tmp_path / 'k', '--max-steps', 8, '--set', 'threads=2'])
    assert other.returncode == 0, other.stderr[-3000:]
    assert 'note: the checkpoint was computed on another kind of machine' in other.stdout and 'threads 1' in other.stdout
    starts = events(read_jsonl(tmp_path / 'k' / 'train.jsonl'), 'run_start')
    assert [s['machine'] for s in starts] == [here, here, {**here, 'threads': 2}]
    assert 'machine_saved' not in starts[0] and 'machine_saved' not in starts[1]
    assert starts[2]['machine_saved'] == here
