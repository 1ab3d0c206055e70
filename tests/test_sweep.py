"""Sweeps (mirrormeta.sweep, experiments/sweep.py): the grid, its errors, printed commands,
and a tiny real local sweep of the smoke config (2 runs), its skip-on-rerun and aggregate.

The two real runs differ only in ``seed``, so they share one compiled meta-step (and the
persistent compilation cache of tests/conftest.py makes reruns cheap).
"""
import csv
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.sweep import load_config
from mirrormeta import MirrormetaError, checkpoint, sweep

REPO = Path(__file__).resolve().parents[1]
TINY = ['--config.num_steps=2', '--config.eval_every=2', '--config.checkpoint_every=2',
        '--config.log_every=1', '--config.val_tasks=4', '--config.test_tasks=4',
        '--config.progress=False']


def run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             JAX_COMPILATION_CACHE_DIR=str(REPO / '.jax_cache'))
  return subprocess.run([sys.executable, '-m', 'experiments.sweep', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


# --- the grid ----------------------------------------------------------------------------

def test_parse_grid_and_expand():
  axes = sweep.parse_grid(' algorithm=maml, metamida ;config.inner_steps=1,5;'
                          ' mlp_hidden=(40,40),(64, 64) ;')
  assert axes == [sweep.Axis('algorithm', ('maml', 'metamida')),
                  sweep.Axis('inner_steps', ('1', '5')),
                  sweep.Axis('mlp_hidden', ('(40,40)', '(64, 64)'))]
  runs = sweep.expand(axes[:2])
  assert runs == [{'algorithm': 'maml', 'inner_steps': '1'},
                  {'algorithm': 'maml', 'inner_steps': '5'},
                  {'algorithm': 'metamida', 'inner_steps': '1'},
                  {'algorithm': 'metamida', 'inner_steps': '5'}]  # first axis slowest
  assert sweep.run_name(runs[1]) == 'algorithm=maml,inner_steps=5'
  assert sweep.run_name({'mlp_hidden': '(64, 64)', 'data_dir': 'a/b'}) == \
      'mlp_hidden=(64,64),data_dir=a_b'


@pytest.mark.parametrize('spec, message', [
    ('algorithm maml', "--sweep: 'algorithm maml' is not field=value[,value...] (axes are "
                       "separated by ';'"),
    ('inner_steps=1,,5', "--sweep: inner_steps has an empty value in '1,,5'"),
    ('inner_steps=', "--sweep: inner_steps has an empty value in ''"),
    ('inner_steps=1,1', '--sweep: inner_steps lists 1 twice'),
    ('seed=1; seed=2', '--sweep: seed is swept twice'),
    ('optimizer.lr=1;optimizer=2', '--sweep: optimizer.lr and optimizer overlap'),
    ('mlp_hidden=(40,40', "--sweep: unclosed bracket in 'mlp_hidden=(40,40'"),
    ('2x=1', "--sweep: '2x=1' is not field=value"),
    (' ; ', '--sweep is empty'),
])
def test_malformed_grid_is_one_line(spec, message):
  with pytest.raises(MirrormetaError) as e:
    sweep.parse_grid(spec)
  assert str(e.value).startswith(message) and '\n' not in str(e.value)


@pytest.mark.parametrize('overrides, spec, message', [
    ([], 'inner_lrr=0.1,0.2', "--sweep inner_lrr=0.1: unknown config field 'inner_lrr' in "
                              "--config.inner_lrr (did you mean 'inner_lr'?)"),
    ([], 'shot=1,one', '--sweep shot=one: flag --config.shot=one: invalid literal for int()'),
    ([], 'optimizer.momentum=0.5,1.5', 'run optimizer.momentum=1.5: config.optimizer.momentum'
                                       '=1.5 must be in [0, 1)'),
    ([], 'model=conv4,mlp', "run model=mlp: config.model='mlp' does not fit the data"),
    (['--config.seed=3'], 'seed=0,1', '--config.seed and --sweep both set seed; drop one'),
    (['--config.shot=one'], 'seed=0,1', 'flag --config.shot=one: invalid literal for int()'),
])
def test_bad_field_or_value_names_it(tmp_path, overrides, spec, message):
  with pytest.raises(MirrormetaError) as e:
    sweep.plan('smoke', overrides, spec, tmp_path / 'root', load_config)
  assert str(e.value).startswith(message) and '\n' not in str(e.value)
  assert not (tmp_path / 'root').exists()


def test_plan_builds_each_runs_config(tmp_path):
  runs = sweep.plan('smoke', ['--config.num_steps=7'], 'algorithm=maml,metamida; inner_steps=1,5',
                    tmp_path, load_config)
  assert [r.name for r in runs] == ['algorithm=maml,inner_steps=1', 'algorithm=maml,inner_steps=5',
                                    'algorithm=metamida,inner_steps=1',
                                    'algorithm=metamida,inner_steps=5']
  for r in runs:
    assert r.workdir == tmp_path / r.name
    assert (r.config.algorithm, str(r.config.inner_steps)) == (r.overrides['algorithm'],
                                                              r.overrides['inner_steps'])
    assert r.config.num_steps == 7 and r.config.name == 'smoke'


def test_workdir_of_another_run_is_refused(tmp_path):
  run = sweep.plan('smoke', [], 'seed=0,1', tmp_path, load_config)[1]
  other = load_config(['--config=smoke', '--config.seed=1', '--config.shot=2'])
  run.workdir.mkdir(parents=True)
  checkpoint.write_config(run.workdir, other)
  with pytest.raises(MirrormetaError, match=r'^run seed=1: --workdir .* holds a run of a '
                                            r'different config \(shot: 1 here vs 2 there\)'):
    sweep.plan('smoke', [], 'seed=0,1', tmp_path, load_config)


# --- print mode ---------------------------------------------------------------------------

def test_print_mode_gives_one_runner_command_per_run(tmp_path):
  root = tmp_path / 'root'
  p = run_cli('--config=smoke', "--sweep=algorithm=maml,metamida; inner_steps=1,5",
              '--config.num_steps=300', f'--root={root}', '--mode=print')
  assert p.returncode == 0, p.stderr[-2000:]
  lines = p.stdout.splitlines()
  assert lines[0] == ('python -m experiments.run --config=smoke --config.num_steps=300 '
                      f'--config.algorithm=maml --config.inner_steps=1 '
                      f'--workdir={root}/algorithm=maml,inner_steps=1')
  assert len(lines) == 4
  for line, (alg, k) in zip(lines, [('maml', 1), ('maml', 5), ('metamida', 1),
                                    ('metamida', 5)]):
    argv = shlex.split(line)
    assert argv[:3] == ['python', '-m', 'experiments.run']
    config = load_config([a for a in argv[3:] if a.startswith('--config')])
    assert (config.algorithm, config.inner_steps, config.num_steps) == (alg, k, 300)
    assert argv[-1] == f'--workdir={root}/algorithm={alg},inner_steps={k}'
  assert '--mode=aggregate' in p.stderr
  plan = json.loads((root / 'sweep.json').read_text())  # print mode writes only the plan
  assert [p.name for p in root.iterdir()] == ['sweep.json']
  assert plan['fields'] == ['algorithm', 'inner_steps'] and len(plan['runs']) == 4

  # A finished run is skipped; the aggregate lists every run with its status.
  runs = sweep.plan('smoke', ['--config.num_steps=300'], plan['sweep'], root, load_config)
  runs[0].workdir.mkdir()
  checkpoint.write_config(runs[0].workdir, runs[0].config)
  (runs[0].workdir / 'results.json').write_text(json.dumps(fake_results(61.5)))
  out, err = io.StringIO(), io.StringIO()
  assert sweep.print_commands(runs, out=out, err=err) == 3
  assert runs[0].name not in out.getvalue() and f'skipped: {runs[0].workdir}' in err.getvalue()
  paths = sweep.aggregate(root)
  md = paths['markdown'].read_text()
  assert '| algorithm=maml,inner_steps=1 | maml | 1 | accuracy 61.50% | 1.25% | 600 | 5 |' in md
  assert md.count('| not started |') == 3
  assert paths['plot'].read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def fake_results(acc):
  curve = [20.0, acc - 10, acc]
  return {'name': 'smoke', 'algorithm': 'maml', 'metric': 'accuracy', 'accuracy': acc,
          'accuracy_ci95': 1.25, 'num_tasks': 600, 'inner_steps': 5,
          'checkpoint': {'which': 'best', 'step': 300, 'path': '-'},
          'per_step': {'step': [0, 1, 2], 'accuracy': curve, 'accuracy_ci95': [1, 1, 1.25],
                       'loss': [1.6, 1.0, 0.9], 'loss_ci95': [0.1, 0.1, 0.1]},
          'train': {'steps': 300, 'resumed_from': 0, 'wall_s': 12.5}}


def test_bad_command_line_is_one_error_line(tmp_path):
  root = tmp_path / 'root'
  cases = {
      'bad value': (['--config=smoke', '--sweep=inner_steps=1,x', f'--root={root}'],
                    "error: --sweep inner_steps=x: flag --config.inner_steps=x: invalid literal"),
      'no sweep': (['--config=smoke', f'--root={root}', '--mode=print'],
                   "error: pass --sweep='field=v1,v2; other=v3,v4'"),
      'unknown config': (['--config=smok', '--sweep=seed=1', f'--root={root}'],
                         "error: unknown config 'smok'"),
      'aggregate nothing': (['--mode=aggregate', f'--root={root}'],
                            f'error: --root {root} does not exist'),
  }
  for name, (args, message) in cases.items():
    p = run_cli(*args)
    assert p.returncode == 2, (name, p.stderr[-2000:])
    assert p.stdout == '' and len(p.stderr.strip().splitlines()) == 1, (name, p.stderr)
    assert p.stderr.startswith(message), (name, p.stderr)
  assert not root.exists()


# --- a real local sweep -------------------------------------------------------------------

@pytest.fixture(scope='module')
def local_sweep(omniglot_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp('sweep') / 'root'
  overrides = TINY + [f'--config.data_dir={omniglot_dir}']
  spec = 'seed=0,1'
  runs = sweep.plan('smoke', overrides, spec, root, load_config)
  sweep.write_plan(root, runs, spec, 'smoke', overrides)
  status = sweep.run_local(runs)
  paths = sweep.aggregate(root)
  return root, runs, status, paths, overrides


def test_local_sweep_runs_and_aggregates(local_sweep):
  root, runs, status, paths, _ = local_sweep
  assert status == {'seed=0': 'done', 'seed=1': 'done'}
  assert sorted(p.name for p in root.iterdir()) == ['seed=0', 'seed=1', 'sweep.csv',
                                                    'sweep.json', 'sweep.md', 'sweep.png']
  results = [json.loads((r.workdir / 'results.json').read_text()) for r in runs]
  assert [json.loads((r.workdir / 'config.json').read_text())['seed'] for r in runs] == [0, 1]
  assert results[0]['per_step'] != results[1]['per_step']  # other seed, other run

  rows = list(csv.DictReader(paths['csv'].open()))
  assert [row['run'] for row in rows] == ['seed=0', 'seed=1']
  for row, res in zip(rows, results):
    assert row['seed'] == row['run'][-1] and row['status'] == 'done'
    assert row['metric'] == 'accuracy'
    assert float(row['value']) == res['accuracy'] and float(row['ci95']) == res['accuracy_ci95']
    assert [float(row[f'k{k}']) for k in range(4)] == res['per_step']['accuracy']
    assert row['eval_inner_steps'] == '3' and row['train_steps'] == '2'
  md = paths['markdown'].read_text()
  for r, res in zip(runs, results):
    assert (f'| {r.name} | {r.name[-1]} | accuracy {res["accuracy"]:.2f}% | '
            f'{res["accuracy_ci95"]:.2f}% | 4 | 3 | best @ 2 | 2 |') in md
  assert '2 runs: 2 done.' in md and '![' in md
  assert paths['plot'].read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_rerun_skips_finished_runs(local_sweep):
  root, _, _, _, overrides = local_sweep
  runs = sweep.plan('smoke', overrides, 'seed=0,1', root, load_config)
  before = {r.name: (r.workdir / 'results.json').stat().st_mtime_ns for r in runs}

  def must_not_train(config, workdir):
    raise AssertionError(f'{workdir} was finished')
  assert sweep.run_local(runs, train_fn=must_not_train) == {'seed=0': 'skipped',
                                                            'seed=1': 'skipped'}
  assert {r.name: (r.workdir / 'results.json').stat().st_mtime_ns for r in runs} == before
  out = io.StringIO()
  assert sweep.print_commands(runs, out=out, err=io.StringIO()) == 0 and out.getvalue() == ''


def test_aggregate_alone_from_the_command_line(local_sweep, tmp_path):
  root = tmp_path / 'copy'
  shutil.copytree(local_sweep[0], root)
  for name in ('sweep.md', 'sweep.csv', 'sweep.png', 'sweep.json'):
    (root / name).unlink()  # without the plan, the swept fields are the ones that differ
  p = run_cli('--mode=aggregate', f'--root={root}')
  assert p.returncode == 0, p.stderr[-2000:]
  assert p.stdout.startswith(f'sweep report: {root}/sweep.md')
  rows = list(csv.DictReader((root / 'sweep.csv').open()))
  assert [(row['run'], row['seed']) for row in rows] == [('seed=0', '0'), ('seed=1', '1')]
  assert (root / 'sweep.png').is_file() and (root / 'sweep.md').is_file()
