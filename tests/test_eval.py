"""`tinylm_eval` as a command, and its agreement with lm-eval-harness: the same exported model, the same local files,
the same accuracy for every BLiMP paradigm and the same acc and acc_norm for multiple choice (nbs/13a_tasks.ipynb,
nbs/17a_eval.ipynb)."""
from __future__ import annotations
import json, os, random, subprocess, sys, textwrap
from pathlib import Path

import pytest

from conftest import assert_clean_error, env, tiny_args
from test_documents import WORDS, make_docs, ok, train, write_docs

HERE = Path(__file__).resolve().parent
BLIMP_CANDIDATES = [os.environ.get('TINYLM_BLIMP'), HERE.parent.parent / 'shared' / 'data' / 'blimp',
                    Path('/work/shared/data/blimp')]
BLIMP = next((Path(p) for p in BLIMP_CANDIDATES if p and (Path(p) / 'adjunct_island.jsonl').is_file()), None)
REAL_PARADIGMS = ('anaphor_number_agreement', 'determiner_noun_agreement_2', 'adjunct_island',
                  'regular_plural_subject_verb_agreement_1')

MODELS = {'char-gpt2': ([], {'block_size': 64}),      # contexts long enough for every sentence they score
          'bpe-apertus': (['--config', 'modern', '--set', 'tokenizer=bpe', '--set', 'bpe_vocab_size=300'],
                          {'block_size': 160})}


def tinylm_eval(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'tinylm.evaluate', *map(str, args)], capture_output=True, text=True,
                          env=env(), timeout=timeout)


def write_paradigm(folder: Path, name: str, term: str, pairs: list) -> Path:
    "One paradigm in BLiMP's format."
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(dict(sentence_good=g, sentence_bad=b, field='syntax', linguistics_term=term, UID=name,
                             pairID=str(i))) for i, (g, b) in enumerate(pairs)]
    path = folder / f'{name}.jsonl'
    path.write_text('\n'.join(lines) + '\n')
    return path


def made_up_blimp(folder: Path) -> Path:
    "Two paradigms made of the training documents' words: their order reversed, and a word doubled."
    docs = make_docs(200, seed=99, longest=8, sentences=1)
    write_paradigm(folder, 'reversed', 'order', [(d, ' '.join(d.rstrip('.').split()[::-1]) + '.') for d in docs[:60]])
    doubled = [(d, d.replace(' ', ' ' + d.split()[0].lower() + ' ', 1)) for d in docs[60:] if ' ' in d]
    write_paradigm(folder, 'doubled', 'repetition', doubled[:60])
    return folder


def made_up_questions(path: Path) -> Path:
    "Multiple-choice questions: a document's start, its true end among made-up ones; one with an empty context."
    rng = random.Random(5)
    lines = []
    for d in make_docs(80, seed=123, longest=10, sentences=1):
        words = d.split()
        if len(words) < 4:
            continue
        cut = len(words) // 2
        wrong = [' '.join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))) + '.' for _ in range(2)]
        label = rng.randrange(3)
        choices = wrong[:label] + [' '.join(words[cut:])] + wrong[label:]
        lines.append(dict(context=' '.join(words[:cut]), choices=choices, label=label))
    lines.append(dict(context='', choices=['The king sat.', 'king The sat.'], label=0))
    path.write_text(''.join(json.dumps(q) + '\n' for q in lines))
    return path


@pytest.fixture(scope='module', params=list(MODELS))
def exported(request, tmp_path_factory):
    "A tiny model trained on documents (so it has the end-of-text token), and its Hugging Face export."
    d = tmp_path_factory.mktemp(request.param)
    data = write_docs(d / 'docs.jsonl', make_docs(3000, seed=11, longest=8, sentences=2))
    out = d / 'run'
    recipe, shape = MODELS[request.param]
    ok(train(['--data', data, '--out-dir', out, '--max-steps', 120, *recipe,
              *tiny_args(dropout=0.0, sampling_cadence=0, eval_cadence=0, checkpoint_cadence=120, lr_decay_steps=120,
                         learning_rate=1e-2, min_lr=1e-3, **shape)]))
    hf = d / 'hf'
    ok(subprocess.run([sys.executable, '-m', 'tinylm.interop', str(out), str(hf)], capture_output=True, text=True,
                      env=env()))
    return request.param, out, hf


def test_the_command_scores_blimp_and_writes_every_paradigm(exported, tmp_path):
    name, out, _ = exported
    blimp = made_up_blimp(tmp_path / 'blimp')
    p = ok(tinylm_eval('--checkpoint', out, '--task', 'blimp', '--data', blimp, '--json', tmp_path / 'r.json'))
    assert p.stdout.startswith('BLiMP: 2 paradigms, 120 pairs\n') and 'mean over paradigms' in p.stdout
    r = json.loads((tmp_path / 'r.json').read_text())
    assert set(r['paradigms']) == {'reversed', 'doubled'} and r['step'] == 120 and r['run_id']
    assert r['machine']['device'] == 'cpu' and r['seconds'] > 0
    assert r['paradigms']['doubled']['accuracy'] > 0.7, r['paradigms']   # a capital only starts its documents
    limited = ok(tinylm_eval('--checkpoint', out, '--task', 'blimp', '--data', blimp, '--limit', 5))
    assert limited.stdout.startswith('BLiMP: 2 paradigms, 10 pairs\n')


@pytest.mark.parametrize('case', ['limit', 'folder', 'format', 'label', 'checkpoint'])
def test_bad_input_is_one_error_line(case, exported, tmp_path):
    _, out, _ = exported
    blimp = made_up_blimp(tmp_path / 'blimp')
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'bad.jsonl').write_text('{"sentence_good": "A king."}\n')
    (tmp_path / 'q.jsonl').write_text('{"context": "A", "choices": ["b", "c"], "label": -1}\n')
    (tmp_path / 'x.pt').write_bytes(b'')
    args, expected = {
        'limit': (['--task', 'blimp', '--data', blimp, '--limit', 0], '--limit must be at least 1, got 0'),
        'folder': (['--task', 'blimp', '--data', tmp_path / 'empty'], 'holds no .jsonl files'),
        'format': (['--task', 'blimp', '--data', tmp_path / 'bad.jsonl'], "line 1: no 'sentence_bad' field"),
        'label': (['--task', 'choice', '--data', tmp_path / 'q.jsonl'], "'label' is -1, out of range for 2"),
        'checkpoint': (['--task', 'blimp', '--data', blimp, '--checkpoint', tmp_path / 'x.pt'], 'is empty (0 bytes)'),
    }[case]
    checkpoint = [] if case == 'checkpoint' else ['--checkpoint', out]
    p = tinylm_eval(*checkpoint, *args)
    assert_clean_error(p.returncode, p.stdout, p.stderr, 1, (expected,))


# ---------------------------------------------------------------- tasks scored during training
SCORES = ('name', 'task', 'step', 'accuracy', 'pairs', 'terms', 'paradigms', 'acc', 'acc_norm', 'questions')


def task_records(out: Path) -> list[dict]:
    "The `task_eval` records of a run, without what differs from one execution to the next (times, ids, paths)."
    records = [json.loads(line) for line in (out / 'train.jsonl').read_text().splitlines()]
    return [{k: r[k] for k in SCORES if k in r} for r in records if r['event'] == 'task_eval']


@pytest.fixture(scope='module')
def task_files(tmp_path_factory):
    "A corpus of documents, a BLiMP-format folder and a multiple-choice file of its words."
    d = tmp_path_factory.mktemp('tasks')
    data = write_docs(d / 'docs.jsonl', make_docs(1500, seed=11, longest=8, sentences=2))
    return data, made_up_blimp(d / 'blimp'), made_up_questions(d / 'questions.jsonl')


def task_args(blimp: Path, questions: Path, **over) -> list:
    return tiny_args(**{'dropout': 0.0, 'sampling_cadence': 0, 'eval_cadence': 0, 'checkpoint_cadence': 6,
                        'eval_tasks': '[blimp, choice]', 'eval_task_data': f'[{blimp}, {questions}]',
                        'eval_task_cadence': 4, 'eval_task_limit': 20, **over})


def test_tasks_scored_during_training_are_logged_and_resume_exactly(task_files, tmp_path):
    data, blimp, questions = task_files
    whole, first = tmp_path / 'whole', tmp_path / 'part'
    p = ok(train(['--data', data, '--out-dir', whole, '--max-steps', 12, *task_args(blimp, questions)]))
    assert 'step 4 | blimp ' in p.stdout and '(2 paradigms, 40 pairs' in p.stdout and '| choice acc ' in p.stdout
    scored = task_records(whole)
    assert [(r['step'], r['name']) for r in scored] == [(s, n) for s in (4, 8, 12) for n in ('blimp', 'choice')]
    assert set(scored[0]['paradigms']) == {'reversed', 'doubled'} and scored[1]['questions'] == 20
    ok(train(['--data', data, '--out-dir', first, '--max-steps', 6, *task_args(blimp, questions)]))
    ok(train(['--resume', first, '--max-steps', 12]))
    resumed = [r for r in task_records(first) if r['step'] > 6]
    assert resumed == [r for r in scored if r['step'] > 6]          # the same scores, at the same steps, to the bit
    no_tasks = tmp_path / 'plain'
    ok(train(['--data', data, '--out-dir', no_tasks, '--max-steps', 12, *task_args(blimp, questions, eval_tasks='[]',
                                                                                  eval_task_data='[]')]))
    losses = [[json.loads(line).get('loss') for line in (run / 'train.jsonl').read_text().splitlines()
               if json.loads(line)['event'] == 'step'] for run in (whole, no_tasks)]
    assert losses[0] == losses[1]                                 # scoring changes nothing that training computes
    plot = subprocess.run([sys.executable, '-m', 'tinylm.plot', str(whole)], capture_output=True, text=True, env=env())
    assert plot.returncode == 0 and '3 task scores' in plot.stdout, plot.stdout + plot.stderr


@pytest.mark.parametrize('case', ['folder', 'no_eot', 'lengths', 'task'])
def test_bad_task_settings_stop_the_run_before_step_1(case, task_files, tmp_path):
    data, blimp, questions = task_files
    text = tmp_path / 'plain.txt'
    text.write_text(''.join(make_docs(300, seed=3)))
    over, corpus, expected = {
        'folder': ({'eval_tasks': '[blimp]', 'eval_task_data': f'[{tmp_path / "nowhere"}]'}, data,
                   'eval_tasks: blimp: BLiMP data not found'),
        'no_eot': ({'eval_tasks': '[blimp]', 'eval_task_data': f'[{blimp}]'}, text, 'no end-of-text token'),
        'lengths': ({'eval_tasks': '[blimp, choice]', 'eval_task_data': f'[{blimp}]'}, data,
                    'eval_task_data must name one folder or file per task'),
        'task': ({'eval_tasks': 'blimp,choice', 'eval_task_data': f'[{blimp}]'}, data,
                 "eval_tasks: 'blimp,choice' is not a task"),
    }[case]
    out = tmp_path / 'run'
    p = train(['--data', corpus, '--out-dir', out, '--max-steps', 4, *task_args(blimp, questions, **over)])
    assert_clean_error(p.returncode, p.stdout, p.stderr, 1, (expected,))
    assert not (out / 'checkpoints').exists() or not any((out / 'checkpoints').glob('*.pt'))


# ---------------------------------------------------------------- agreement with lm-eval-harness
BLIMP_YAML = '''\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {path}
output_type: multiple_choice
validation_split: train
doc_to_text: ""
doc_to_target: 0
doc_to_choice: "{{{{[sentence_good, sentence_bad]}}}}"
num_fewshot: 0
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
'''

CHOICE_YAML = '''\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {path}
output_type: multiple_choice
test_split: train
doc_to_text: context
doc_to_target: label
doc_to_choice: choices
num_fewshot: 0
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
'''

LM_EVAL = textwrap.dedent('''
    import json, sys
    import lm_eval
    from lm_eval.tasks import TaskManager
    hf, tasks_dir, names, limit = sys.argv[1], sys.argv[2], sys.argv[3].split(','), sys.argv[4]
    out = lm_eval.simple_evaluate(model='hf', model_args=f'pretrained={hf},dtype=float32', tasks=names,
                                  task_manager=TaskManager(include_path=tasks_dir), device='cpu', batch_size=16,
                                  limit=int(limit) if limit != 'none' else None)
    print(json.dumps({n: out['results'][n] for n in names}))
''')


def lm_eval_results(hf: Path, tasks: dict, folder: Path, limit: int | None = None) -> dict:
    "lm-eval's results for `tasks` ({name: yaml}) on the exported model `hf`, run offline in its own process."
    folder.mkdir()
    for name, text in tasks.items():
        (folder / f'{name}.yaml').write_text(text)
    e = {**env(), 'HF_HOME': str(folder / 'hf_home'), 'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1',
         'TOKENIZERS_PARALLELISM': 'false'}
    p = subprocess.run([sys.executable, '-c', LM_EVAL, str(hf), str(folder), ','.join(tasks), str(limit or 'none')],
                       capture_output=True, text=True, env=e, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def blimp_agreement(out: Path, hf: Path, folder: Path, tmp_path: Path, limit: int | None = None):
    "Every paradigm of `folder`: tinylm_eval's accuracy equals lm-eval's."
    tmp_path.mkdir(exist_ok=True)
    limit_args = ['--limit', limit] if limit else []
    ok(tinylm_eval('--checkpoint', out, '--task', 'blimp', '--data', folder, '--json', tmp_path / 'ours.json',
                   *limit_args))
    ours = json.loads((tmp_path / 'ours.json').read_text())['paradigms']
    tasks = {f'tinylm_blimp_{name}': BLIMP_YAML.format(task=f'tinylm_blimp_{name}', path=folder / f'{name}.jsonl')
             for name in ours}
    theirs = lm_eval_results(hf, tasks, tmp_path / 'tasks', limit)
    assert {n: ours[n]['accuracy'] for n in ours} == {n: theirs[f'tinylm_blimp_{n}']['acc,none'] for n in ours}
    return ours


@pytest.mark.slow
def test_lm_eval_agrees_on_every_paradigm_and_question(exported, tmp_path):
    pytest.importorskip('lm_eval')
    name, out, hf = exported
    blimp_agreement(out, hf, made_up_blimp(tmp_path / 'blimp'), tmp_path / 'made_up')
    questions = made_up_questions(tmp_path / 'questions.jsonl')
    ok(tinylm_eval('--checkpoint', out, '--task', 'choice', '--data', questions, '--json', tmp_path / 'c.json'))
    ours = json.loads((tmp_path / 'c.json').read_text())
    theirs = lm_eval_results(hf, {'tinylm_choice': CHOICE_YAML.format(task='tinylm_choice', path=questions)},
                             tmp_path / 'choice_tasks')['tinylm_choice']
    assert (ours['acc'], ours['acc_norm']) == (theirs['acc,none'], theirs['acc_norm,none'])
    assert 0 < ours['acc'] < 1 or 0 < ours['acc_norm'] < 1   # the questions tell a right answer from a wrong one


@pytest.mark.slow
@pytest.mark.skipif(BLIMP is None, reason='BLiMP is not on this machine (set TINYLM_BLIMP to its folder)')
def test_lm_eval_agrees_on_real_blimp_paradigms(exported, tmp_path):
    pytest.importorskip('lm_eval')
    name, out, hf = exported
    if not name.startswith('bpe'):
        pytest.skip("a character model of made-up documents cannot encode BLiMP's characters")
    folder = tmp_path / 'blimp'
    folder.mkdir()
    for paradigm in REAL_PARADIGMS:
        (folder / f'{paradigm}.jsonl').write_bytes((BLIMP / f'{paradigm}.jsonl').read_bytes())
    ours = blimp_agreement(out, hf, folder, tmp_path, limit=100)
    assert all(r['pairs'] == 100 for r in ours.values())
