"""Fine-tuning on conversations through the command: a pretrained model grows by the chat tokens, the loss counts the
assistant's targets over the whole global batch (one process, gradient accumulation, two gloo processes agree), a
fine-tune resumes exactly, and every bad conversation file gets one error line naming its file and line."""
from __future__ import annotations
import json, os, random, subprocess, sys
from pathlib import Path

import pytest
import torch

from conftest import assert_clean_error, env, events, losses, make_corpus, read_jsonl, tiny_args, tinylm_train_exe

LETTERS = 'abcdefghij'


def conversations(n: int, seed: int = 0) -> list[dict]:
    """`n` conversations of very different lengths (so that micro-batches count very different numbers of targets):
    reverse a string of letters, some with a system message, some with two exchanges."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        system = i % 3 == 0 and i % 4 != 0   # (every conversation fits a context of 33 tokens)
        messages = [{'role': 'system', 'content': 'rev ' * rng.randint(0, 2)}] if system else []
        for _ in range(1 + (i % 4 == 0)):
            word = ''.join(rng.choice(LETTERS) for _ in range(rng.randint(1, 6)))
            messages += [{'role': 'user', 'content': word}, {'role': 'assistant', 'content': word[::-1]}]
        out.append({'messages': messages})
    return out


def write_jsonl(path: Path, records) -> Path:
    path.write_text(''.join((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in records))
    return path


def train(args, timeout=180, e=None) -> subprocess.CompletedProcess:
    return subprocess.run([tinylm_train_exe(), *map(str, args)], capture_output=True, text=True, env=e or env(),
                          timeout=timeout)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"rc={p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


CHAT = dict(dropout=0.0, eval_cadence=4, sampling_cadence=0, checkpoint_cadence=4, lr_decay_steps=12)


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory) -> Path:
    "A tiny character model of one text (no end-of-text token), to fine-tune."
    d = tmp_path_factory.mktemp('pre')
    corpus = make_corpus(d / 'text.txt')
    ok(train(['--data', corpus, '--out-dir', d / 'run', '--max-steps', 6, *tiny_args(sampling_cadence=0)]))
    return d / 'run'


@pytest.fixture(scope='module')
def chats(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp('chats') / 'chats.jsonl', conversations(300))


def test_fine_tuning_grows_the_model_records_it_and_resumes_exactly(pretrained, chats, tmp_path):
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    common = ['--init-from', pretrained, '--data', chats, *tiny_args(**CHAT)]
    ok(train([*common, '--out-dir', straight, '--max-steps', 12]))
    ok(train([*common, '--out-dir', resumed, '--max-steps', 6]))
    ok(train(['--resume', resumed, '--max-steps', 12]))
    a, b = read_jsonl(straight / 'train.jsonl'), read_jsonl(resumed / 'train.jsonl')
    assert losses(a) == losses(events(b, 'step')) and sorted(losses(a)) == list(range(1, 13))
    evals_a = {r['step']: r['val_loss'] for r in events(a, 'eval')}
    evals_b = {r['step']: r['val_loss'] for r in events(b, 'eval')}   # and one more: at the end of the first part
    assert evals_a == {s: v for s, v in evals_b.items() if s in evals_a} and sorted(evals_a) == [4, 8, 12]
    start = events(a, 'run_start')[0]
    assert start['init_from']['added_tokens'] == ['<|endoftext|>', '<|system|>', '<|user|>', '<|assistant|>',
                                                  '<|end|>']
    old, new = start['init_from']['vocab_size']
    assert new == old + 5
    facts = start['corpus']
    assert facts['chat_loss'] == 'assistant' and 0.2 < facts['counted'] < 0.7, facts
    assert facts['conversations'] == 300 and facts['val_conversations'] > 0
    ckpt = torch.load(straight / 'checkpoints' / 'step_000012.pt', weights_only=True)
    assert ckpt['tokenizer']['specials'] == ['<|system|>', '<|user|>', '<|assistant|>', '<|end|>']
    assert ckpt['model']['tok_emb.weight'].shape[0] == new


def test_the_mask_changes_what_is_learnt(pretrained, chats, tmp_path):
    "chat_loss=all counts every target: another loss, another hash, and every target counted."
    base = ['--init-from', pretrained, '--data', chats, '--max-steps', 4, *tiny_args(**CHAT)]
    ok(train([*base, '--out-dir', tmp_path / 'mask']))
    ok(train([*base, '--out-dir', tmp_path / 'all', '--set', 'chat_loss=all']))
    mask, every = read_jsonl(tmp_path / 'mask' / 'train.jsonl'), read_jsonl(tmp_path / 'all' / 'train.jsonl')
    assert events(every, 'run_start')[0]['corpus']['counted'] == 1.0
    assert events(mask, 'run_start')[0]['config_hash'] != events(every, 'run_start')[0]['config_hash']
    assert losses(mask)[1] != losses(every)[1]


def _torchrun(args, timeout=180) -> subprocess.CompletedProcess:
    e = {**env(), 'OMP_NUM_THREADS': '1'}
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        e.pop(k, None)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'tinylm.main',
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e)


@pytest.mark.slow
def test_the_loss_is_the_mean_over_the_global_batch_however_it_is_split(chats, tmp_path):
    """The same global batch of 8 rows: whole in one process, as 2 micro-batches of 4, and over two gloo processes.
    Rows count very different numbers of targets, so a mean taken per micro-batch or per rank would differ."""
    base = ['--data', chats, '--max-steps', 6, *tiny_args(**{**CHAT, 'packing': 'document'})]
    ok(train([*base, '--out-dir', tmp_path / 'one']))
    ok(train([*base, '--out-dir', tmp_path / 'accum', '--set', 'batch_size=4', '--set', 'grad_accum_steps=2']))
    ok(_torchrun([*base, '--out-dir', tmp_path / 'two']))
    one, accum, two = (losses(read_jsonl(tmp_path / k / 'train.jsonl')) for k in ('one', 'accum', 'two'))
    assert sorted(one) == list(range(1, 7))
    for other in (accum, two):
        worst = max(abs(one[s] - other[s]) / one[s] for s in one)
        assert worst < 1e-5, (one, other)


BAD = {
    'no_messages': ({'text': 'hi'}, "no 'messages' field"),
    'bad_role': ({'messages': [{'role': 'bot', 'content': 'hi'}]}, "message 1 has role 'bot'"),
    'content_not_str': ({'messages': [{'role': 'user', 'content': ['hi']}, {'role': 'assistant', 'content': 'a'}]},
                        "message 1's content is a JSON array, not a string"),
    'no_assistant': ({'messages': [{'role': 'user', 'content': 'hi'}]}, 'no assistant turn'),
    'not_json': ('{"messages": [', 'not valid JSON'),
}


@pytest.mark.parametrize('case', list(BAD))
def test_a_bad_conversation_is_one_error_naming_its_file_and_line(case, tmp_path):
    record, message = BAD[case]
    good = conversations(20)
    data = write_jsonl(tmp_path / 'chats.jsonl', [*good[:7], record, *good[7:]])
    p = train(['--data', data, '--out-dir', tmp_path / 'out', '--max-steps', 2, *tiny_args(**CHAT)])
    assert_clean_error(p.returncode, p.stdout, p.stderr, contains=(f"{data} line 8: ", message))
    assert not (tmp_path / 'out' / 'checkpoints').exists() or not any((tmp_path / 'out' / 'checkpoints').iterdir())


def test_long_conversations_are_cut_at_a_turn_or_dropped_and_counted(tmp_path):
    short = conversations(60)
    long_answer = {'messages': [{'role': 'user', 'content': 'a'}, {'role': 'assistant', 'content': 'b' * 40}]}
    two_turns = {'messages': [{'role': 'user', 'content': 'ab'}, {'role': 'assistant', 'content': 'ba'},
                              {'role': 'user', 'content': 'c' * 30}, {'role': 'assistant', 'content': 'c'}]}
    data = write_jsonl(tmp_path / 'chats.jsonl', [*short, long_answer, two_turns])
    p = ok(train(['--data', data, '--out-dir', tmp_path / 'out', '--max-steps', 2, *tiny_args(**CHAT)]))
    facts = events(read_jsonl(tmp_path / 'out' / 'train.jsonl'), 'run_start')[0]['corpus']
    assert (facts['cut_conversations'], facts['dropped_conversations']) == (1, 1)
    assert facts['conversations'] == 61
    assert '1 cut at a turn and 1 dropped to fit the context' in p.stdout


def test_data_format_decides_an_ambiguous_corpus(tmp_path):
    "A file whose records hold both `text` and `messages` reads as conversations, or as documents when told so."
    records = [{**c, 'text': 'some text ' * 5} for c in conversations(40)]
    data = write_jsonl(tmp_path / 'both.jsonl', records)
    args = ['--data', data, '--max-steps', 2, *tiny_args(**CHAT)]
    ok(train([*args, '--out-dir', tmp_path / 'auto']))
    ok(train([*args, '--out-dir', tmp_path / 'docs', '--set', 'data_format=documents']))
    auto = events(read_jsonl(tmp_path / 'auto' / 'train.jsonl'), 'run_start')[0]['corpus']
    docs = events(read_jsonl(tmp_path / 'docs' / 'train.jsonl'), 'run_start')[0]['corpus']
    assert 'conversations' in auto and 'documents' in docs
    text = make_corpus(tmp_path / 'text.txt')
    p = train(['--data', text, '--out-dir', tmp_path / 'bad', '--max-steps', 2, '--set', 'data_format=conversations',
               *tiny_args(**CHAT)])
    assert_clean_error(p.returncode, p.stdout, p.stderr, contains='is not a JSON Lines file')
