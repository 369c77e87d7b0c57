"""Every user error: exit status 1 (argparse usage errors: 2), one `error: ...` line on stderr, no traceback,
and nothing already saved is touched."""
from __future__ import annotations
from pathlib import Path

import pytest
import torch

from conftest import REF_STEPS, assert_clean_error, run_cli, snapshot, tiny_args

from tinylm.main import main


# Each case builds (argv, expected message fragments) from a context; `fresh` cases start a new run into
# ctx.fresh_out (which must not be created), `resume` cases resume the private copy ctx.saved.out.
class Ctx:
    def __init__(self, tmp_path: Path, saved, corpus: Path):
        self.tmp, self.saved, self.corpus = tmp_path, saved, corpus
        self.fresh_out = tmp_path / 'fresh_out'
    def file(self, name, data):
        p = self.tmp / name
        (p.write_bytes if isinstance(data, bytes) else lambda d: p.write_text(d, encoding='utf-8'))(data)
        return p
    def fresh(self, *extra, data=None):
        return ['--data', data or self.corpus, '--out-dir', self.fresh_out, '--max-steps', 4, *tiny_args(), *extra]
    def resume(self, *extra, src=None):
        return ['--resume', src or self.saved.out, *extra]
    def folder(self, name):
        p = self.tmp / name; p.mkdir(); (p / 'notes.txt').write_text('no checkpoints here\n'); return p
    @property
    def last_ckpt(self): return self.saved.ckpt_dir / f'step_{REF_STEPS:06d}.pt'
    def ckpt_copy(self, name, transform):
        data = transform(self.last_ckpt.read_bytes())
        return self.file(name, data)


def _foreign_ckpt(ctx):
    p = ctx.tmp / 'foreign.pt'; torch.save({'weights': torch.zeros(3)}, p); return p

def _pickled_ckpt(ctx):
    p = ctx.tmp / 'pickled.pt'; torch.save({'format': 'tinylm-checkpoint', 'where': Path('/x')}, p); return p

def _no_text(ctx):
    p = ctx.tmp / 'no_text'; p.mkdir(); (p / 'notes.md').write_text('not a .txt file\n'); return p

def _v1_ckpt(ctx):
    "A checkpoint as tinylm 0.1 wrote it: format version 1, the data position as (epoch, position)."
    ck = torch.load(ctx.last_ckpt, weights_only=True)
    p = ctx.tmp / 'v1.pt'; torch.save({**ck, 'version': 1, 'sampler': {'epoch': 0, 'position': REF_STEPS}}, p); return p

def _laughs(ctx):
    "A 1 KB YAML file that expands to ~10**7 strings (the 'billion laughs' shape, 7 levels of 10 aliases)."
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for i in range(1, 8):
        prev, cur = chr(ord('a') + i - 1), chr(ord('a') + i)
        text += f"{cur}: &{cur} [{', '.join(['*' + prev] * 10)}]\n"
    return ctx.file('laughs.yaml', 'n_layer: *h\n' + text)

def _shuffled(ctx):
    lines = ctx.corpus.read_text(encoding='utf-8').splitlines()
    return ctx.file('reordered.txt', '\n'.join(reversed(lines)) + '\n')

CASES = {
    # --- data
    'missing data file': ('fresh', lambda c: c.fresh(data=c.tmp / 'nope.txt'), 'not found'),
    'empty data file': ('fresh', lambda c: c.fresh(data=c.file('empty.txt', b'')), 'empty'),
    'folder without *.txt as data': ('fresh', lambda c: c.fresh(data=_no_text(c)), 'holds no *.txt files'),
    'non-UTF-8 data': ('fresh', lambda c: c.fresh(data=c.file('latin1.txt', 'café au lait\n'.encode('latin-1') * 200)),
                       'UTF-8'),
    'corpus too short for block_size': ('fresh', lambda c: c.fresh(data=c.file('short.txt', 'to be or not\n' * 3)),
                                        'block_size'),
    # --- config
    'bad YAML syntax': ('fresh', lambda c: c.fresh('--config', c.file('bad.yaml', 'n_layer: [1, 2\nseed: 3\n')), 'YAML'),
    'YAML top-level list': ('fresh', lambda c: c.fresh('--config', c.file('list.yaml', '- n_layer\n- 2\n')), 'mapping'),
    'unknown key in YAML': ('fresh', lambda c: c.fresh('--config', c.file('typo.yaml', 'n_layers: 2\n')),
                            ("unknown config key 'n_layers'", "did you mean 'n_layer'")),
    'unknown key on command line': ('fresh', lambda c: c.fresh('--set', 'learning_rat=0.01'),
                                    ("unknown config key 'learning_rat'", "did you mean 'learning_rate'")),
    'missing config file': ('fresh', lambda c: c.fresh('--config', c.tmp / 'nope.yaml'), 'not found'),
    'n_embd not divisible by n_head': ('fresh', lambda c: c.fresh('--set', 'n_embd=30', '--set', 'n_head=4'),
                                       ('n_embd', 'n_head', 'divisible')),
    'negative batch_size': ('fresh', lambda c: c.fresh('--set', 'batch_size=-8'), 'batch_size'),
    'dropout 1.5': ('fresh', lambda c: c.fresh('--set', 'dropout=1.5'), 'dropout'),
    'wrong type': ('fresh', lambda c: c.fresh('--set', 'n_layer=two'), 'n_layer'),
    '--set without =': ('fresh', lambda c: c.fresh('--set', 'dropout'), 'KEY=VALUE'),
    'YAML aliases (billion laughs)': ('fresh', lambda c: c.fresh('--config', _laughs(c)), 'aliases'),
    'a huge wrong-typed value': ('fresh', lambda c: c.fresh('--set', f"n_layer={list(range(100_000))}"),
                                 "'n_layer' expects int, got list"),
    'a huge unknown key': ('fresh', lambda c: c.fresh('--set', 'x' * 100_000 + '=1'), 'unknown config key'),
    'neither a file nor a recipe': ('fresh', lambda c: c.fresh('--config', 'modrn'), 'bundled recipes: '),
    # --- checkpoints
    'missing checkpoint': ('resume', lambda c: c.resume(src=c.tmp / 'nope.pt'), 'not found'),
    'folder without checkpoints': ('resume', lambda c: c.resume(src=c.folder('empty_run')), 'no checkpoint'),
    'truncated checkpoint': ('resume', lambda c: c.resume(src=c.ckpt_copy('trunc.pt', lambda b: b[:len(b) // 2])),
                             'trunc.pt'),
    'corrupt checkpoint': ('resume', lambda c: c.resume(src=c.ckpt_copy('garbage.pt', lambda b: bytes(len(b)))),
                           'garbage.pt'),
    'empty checkpoint': ('resume', lambda c: c.resume(src=c.file('zero.pt', b'')), 'zero.pt'),
    'text file as checkpoint': ('resume', lambda c: c.resume(src=c.file('notes.pt', 'hello\n')), 'notes.pt'),
    'non-tinylm torch file': ('resume', lambda c: c.resume(src=_foreign_ckpt(c)), 'not a tinylm checkpoint'),
    'checkpoint needing pickle': ('resume', lambda c: c.resume(src=_pickled_ckpt(c)), ('pickled.pt', 'weights_only')),
    'format version 1 checkpoint': ('resume', lambda c: c.resume('--max-steps', 60, src=_v1_ckpt(c)),
                                    ('v1.pt', 'format version 1', 'tinylm_sample')),
    '--overwrite with --resume': ('resume', lambda c: c.resume('--max-steps', 60, '--overwrite'), 'cannot be combined'),
    # --- resuming
    'max-steps equal to checkpoint step': ('resume', lambda c: c.resume('--max-steps', REF_STEPS), 'larger --max-steps'),
    'max-steps below checkpoint step': ('resume', lambda c: c.resume('--max-steps', 10), 'larger --max-steps'),
    'resume changing n_layer': ('resume', lambda c: c.resume('--max-steps', 60, '--set', 'n_layer=2'),
                                "cannot change 'n_layer'"),
    'resume changing seed': ('resume', lambda c: c.resume('--max-steps', 60, '--seed', '1'), "cannot change 'seed'"),
    'resume changing n_layer in YAML': ('resume', lambda c: c.resume('--max-steps', 60, '--config',
                                                                     c.file('deep.yaml', 'n_layer: 3\n')),
                                        "cannot change 'n_layer'"),
    'resume on another corpus': ('resume', lambda c: c.resume('--max-steps', 60, '--data', _shuffled(c)),
                                 '--allow-data-change'),
    'resume with characters outside the vocabulary': (
        'resume', lambda c: c.resume('--max-steps', 60, '--allow-data-change', '--data',
                                     c.file('new_chars.txt', c.corpus.read_text(encoding='utf-8') + 'Ωμέγα €100 #7\n')),
        ('vocabulary', 'new_chars.txt')),
    'fresh run into a folder with checkpoints': ('existing', lambda c: ['--data', c.corpus, '--out-dir', c.saved.out,
                                                                        '--max-steps', 4, *tiny_args()],
                                                 ('already holds checkpoints', '--resume', '--overwrite')),
}

# the ones that are also run through the installed command (slower: a new process each)
VIA_CLI = ['missing data file', 'bad YAML syntax', 'unknown key on command line', 'truncated checkpoint',
           'resume changing n_layer', 'fresh run into a folder with checkpoints', 'YAML aliases (billion laughs)']


def check_case(name, ctx, runner):
    kind, build, contains = CASES[name]
    argv = [str(a) for a in build(ctx)]
    before = snapshot(ctx.saved.out)
    rc, out, err = runner(argv)
    line = assert_clean_error(rc, out, err, 1, contains)
    assert len(line) > len('error: ') + 10, line
    # bounded, whatever the input: the longest legitimate line lists the config's field names (~550 characters)
    assert len(err) < 900, f"an error message of {len(err)} characters: {err[:300]}..."
    after = snapshot(ctx.saved.out)
    assert after == before, f"the saved run was modified: {set(after.items()) ^ set(before.items())}"
    if kind == 'fresh': assert not ctx.fresh_out.exists(), "a failed new run created its out_dir"
    return err


@pytest.fixture
def ctx(tmp_path, saved_run, corpus): return Ctx(tmp_path, saved_run, corpus)


@pytest.mark.parametrize('name', list(CASES))
def test_error_in_process(name, ctx, capsys, monkeypatch):
    monkeypatch.delenv('TINYLM_DEBUG', raising=False)
    def runner(argv):
        rc = main(argv)
        out, err = capsys.readouterr()
        return rc, out, err
    check_case(name, ctx, runner)


@pytest.mark.parametrize('name', VIA_CLI)
def test_error_via_cli(name, ctx):
    def runner(argv):
        p = run_cli(argv)
        return p.returncode, p.stdout, p.stderr
    check_case(name, ctx, runner)


def test_resume_changing_eval_cadence_is_allowed(ctx, capsys):
    "The positive control of 'resume changing n_layer': a resumable field is accepted."
    rc = main([str(a) for a in ctx.resume('--max-steps', REF_STEPS + 2, '--set', 'eval_cadence=1')])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert (ctx.saved.ckpt_dir / f'step_{REF_STEPS + 2:06d}.pt').is_file()


def test_help_exits_0_with_usage():
    p = run_cli(['--help'])
    assert p.returncode == 0
    assert p.stdout.startswith('usage: tinylm_train')
    for flag in ('--resume', '--max-steps', '--out-dir', '--set', '--config', '--data', '--allow-data-change'):
        assert flag in p.stdout
    assert 'Traceback' not in p.stderr


@pytest.mark.parametrize('argv,fragment', [(['--bogus-flag'], 'unrecognized arguments: --bogus-flag'),
                                           (['--max-steps', 'many'], "invalid int value: 'many'")],
                         ids=['unknown flag', 'non-integer max-steps'])
def test_usage_errors_exit_2(argv, fragment, tmp_path):
    p = run_cli([*argv, '--out-dir', tmp_path / 'o'])
    assert_clean_error(p.returncode, p.stdout, p.stderr, 2, fragment)
    assert p.stderr.startswith('usage: tinylm_train')
    assert not (tmp_path / 'o').exists()
