"""Sweeps: a grid of config overrides expanded into runs, run or printed, then aggregated.

    python -m experiments.sweep --config=smoke --sweep='algorithm=maml,metamida; inner_steps=1,5'
        [--config.<field>=<value> ...] [--root=runs/sweep] [--mode=local|print|aggregate]

A grid spec is axes separated by ``;``, each ``field=value[,value...]`` (nested fields as
``optimizer.lr``; a value holding commas goes in brackets, ``mlp_hidden=(40,40),(64,64)``).
The runs are the cartesian product of the axes (first axis slowest); run ``r`` is the
command ``python -m experiments.run --config=<config> <base overrides> --config.<f>=<v>...
--workdir=<root>/<f>=<v>,...``, so a sweep's run is exactly a run of the runner, resumable
and re-testable on its own. Every run's config is built and checked (the runner's parser and
:func:`mirrormeta.train.check_config`, and its workdir's stored config) before anything runs.

Files in the root: ``sweep.json`` (the plan: config, overrides, grid, runs), one folder per
run, and the aggregate ``sweep.md``, ``sweep.csv``, ``sweep.png`` (final test metric ± 95% CI
per run, and the per-adaptation-step curves of every run overlaid), read from each run's
``results.json`` (mirrormeta.evaluate).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from mirrormeta.errors import MirrormetaError

PLAN_FILE = 'sweep.json'
RESULTS_FILE = 'results.json'
AGGREGATE_FILES = ('sweep.md', 'sweep.csv', 'sweep.png')
_FIELD = re.compile(r'[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$')
_OPEN, _CLOSE = '([{', ')]}'


@dataclasses.dataclass(frozen=True)
class Axis:
  """One swept field and its values, as written on the command line."""
  field: str
  values: tuple[str, ...]


@dataclasses.dataclass
class Run:
  """One point of the grid.

  Attributes:
    name: the folder name ``<field>=<value>,...``.
    overrides: ``{field: value}`` of this run (command-line strings).
    workdir: ``<root>/<name>``.
    args: the runner's config arguments: ``--config=...`` and every ``--config.x=y``.
    config: the parsed, checked ConfigDict (None for a plan read back from sweep.json).
  """
  name: str
  overrides: dict[str, str]
  workdir: Path
  args: list[str]
  config: Any = None

  @property
  def finished(self) -> bool:
    return (self.workdir / RESULTS_FILE).is_file()


# ------------------------------------------------------------------------------ the grid


def _split_top(text: str, sep: str) -> list[str]:
  """Splits ``text`` at ``sep`` outside brackets; unbalanced brackets are an error."""
  parts, depth, current = [], 0, []
  for ch in text:
    if ch in _OPEN:
      depth += 1
    elif ch in _CLOSE:
      depth -= 1
      if depth < 0:
        raise MirrormetaError(f"--sweep: unbalanced '{ch}' in {text.strip()!r}")
    if ch == sep and depth == 0:
      parts.append(''.join(current))
      current = []
    else:
      current.append(ch)
  if depth:
    raise MirrormetaError(f'--sweep: unclosed bracket in {text.strip()!r}')
  parts.append(''.join(current))
  return parts


def parse_grid(spec: str) -> list[Axis]:
  """``'algorithm=maml,metamida; inner_steps=1,5'`` → the axes, checked for syntax only.

  Field names and value types are checked against the config by :func:`plan`.

  Raises:
    MirrormetaError: one line naming the malformed part.
  """
  axes: list[Axis] = []
  for part in _split_top(spec or '', ';'):
    part = part.strip()
    if not part:
      continue  # tolerate 'a=1;' and doubled separators
    field, eq, values = part.partition('=')
    field = field.strip()
    if field.startswith('--'):
      field = field[2:]
    if field.startswith('config.'):
      field = field[len('config.'):]
    if not eq or not _FIELD.match(field):
      raise MirrormetaError(f'--sweep: {part!r} is not field=value[,value...] (axes are '
                            "separated by ';', e.g. 'algorithm=maml,metamida; inner_steps=1,5')")
    vals = tuple(v.strip() for v in _split_top(values, ','))
    if any(not v for v in vals):
      raise MirrormetaError(f'--sweep: {field} has an empty value in {values.strip()!r}')
    if len(set(vals)) < len(vals):
      dup = next(v for v in vals if vals.count(v) > 1)
      raise MirrormetaError(f'--sweep: {field} lists {dup} twice')
    for other in axes:
      if other.field == field:
        raise MirrormetaError(f'--sweep: {field} is swept twice; put all its values in one '
                              f'axis ({field}=v1,v2,...)')
      if other.field.startswith(field + '.') or field.startswith(other.field + '.'):
        raise MirrormetaError(f'--sweep: {other.field} and {field} overlap; sweep one of them')
    axes.append(Axis(field, vals))
  if not axes:
    raise MirrormetaError("--sweep is empty; give at least one axis, e.g. --sweep='seed=0,1,2'")
  return axes


def expand(axes: Sequence[Axis]) -> list[dict[str, str]]:
  """The cartesian product of the axes, first axis slowest: ``[{field: value}, ...]``."""
  return [dict(zip([a.field for a in axes], combo))
          for combo in itertools.product(*[a.values for a in axes])]


def run_name(overrides: dict[str, str]) -> str:
  """``{'algorithm': 'maml', 'inner_steps': '5'}`` → ``'algorithm=maml,inner_steps=5'``.

  Spaces are dropped and path separators become '_' so the name is one folder.
  """
  def clean(v: str) -> str:
    return re.sub(r'\s+', '', v).replace('/', '_').replace(os.sep, '_')
  return ','.join(f'{k}={clean(v)}' for k, v in overrides.items())


def override_args(overrides: dict[str, str]) -> list[str]:
  return [f'--config.{k}={v}' for k, v in overrides.items()]


def base_override_fields(base_overrides: Iterable[str]) -> list[str]:
  """Field names of ``--config.x=y`` arguments (also ``--config.flag`` / ``--noconfig.flag``)."""
  fields = []
  for arg in base_overrides:
    m = re.match(r'-{1,2}(?:no)?config\.([^=]+)', arg)
    if not m:
      raise MirrormetaError(f'{arg!r} is not a config override (--config.<field>=<value>)')
    fields.append(m.group(1))
  return fields


# ---------------------------------------------------------------------------- the plan


def plan(config_arg: str, base_overrides: Sequence[str], spec: str, root: str | os.PathLike,
         load_config: Callable[[list[str]], Any]) -> list[Run]:
  """Expands the grid into runs and checks every one before anything runs.

  Args:
    config_arg: the ``--config`` value (a config name or file, as for experiments.run).
    base_overrides: ``--config.x=y`` arguments applied to every run.
    spec: the grid (:func:`parse_grid`).
    root: the sweep's folder; run r lives in ``<root>/<run_name>``.
    load_config: the runner's parser: ``load_config(['--config=...', '--config.x=y', ...])
      -> ConfigDict``, raising MirrormetaError with one line for an unknown config or
      field or a wrong-typed value (experiments.sweep passes experiments.run's).

  Returns:
    The runs in grid order, each with its checked config.

  Raises:
    MirrormetaError: a malformed grid, a field set both by an override and the grid, an
      unknown field or bad value (naming the grid value), an impossible config (naming the
      run), or a run folder holding a different run.
  """
  from mirrormeta import checkpoint, train  # pylint: disable=g-import-not-at-top

  axes = parse_grid(spec)
  base = [f'--config={config_arg}', *base_overrides]
  fixed = base_override_fields(base_overrides)
  for axis in axes:
    for f in fixed:
      if f == axis.field or f.startswith(axis.field + '.') or axis.field.startswith(f + '.'):
        raise MirrormetaError(f'--config.{f} and --sweep both set {axis.field}; drop one')
  load_config(base)  # the base alone: its errors are not the grid's
  for axis in axes:  # every value alone, so an error names it
    for value in axis.values:
      try:
        load_config(base + override_args({axis.field: value}))
      except MirrormetaError as e:
        raise MirrormetaError(f'--sweep {axis.field}={value}: {e}') from None
  root = Path(root).expanduser()
  runs, names = [], set()
  for overrides in expand(axes):
    name = run_name(overrides)
    if name in names:
      raise MirrormetaError(f'--sweep: two runs would share the folder {name!r}; use values '
                            'that differ after removing spaces and slashes')
    names.add(name)
    args = base + override_args(overrides)
    config = load_config(args)
    workdir = root / name
    try:
      train.check_config(config)
      checkpoint.check_workdir(workdir, config)
    except MirrormetaError as e:
      raise MirrormetaError(f'run {name}: {e}') from None
    runs.append(Run(name, overrides, workdir, args, config))
  return runs


def write_plan(root: str | os.PathLike, runs: Sequence[Run], spec: str,
               config_arg: str, base_overrides: Sequence[str]) -> Path:
  """Writes ``<root>/sweep.json``: what the sweep is, so aggregation knows every run."""
  root = Path(root).expanduser()
  root.mkdir(parents=True, exist_ok=True)
  path = root / PLAN_FILE
  text = json.dumps({'config': config_arg, 'overrides': list(base_overrides), 'sweep': spec,
                     'fields': list(runs[0].overrides) if runs else [],
                     'runs': [{'name': r.name, 'overrides': r.overrides} for r in runs]},
                    indent=2) + '\n'
  tmp = path.with_name(PLAN_FILE + '.tmp')
  tmp.write_text(text)
  os.replace(tmp, path)
  return path


def read_plan(root: str | os.PathLike) -> dict | None:
  path = Path(root).expanduser() / PLAN_FILE
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise MirrormetaError(f'cannot read {path} ({e})') from None


# ------------------------------------------------------------------------- running them


def command(run: Run, python: str = 'python') -> str:
  """The shell command that runs ``run`` alone (on any machine with the repository)."""
  return shlex.join([python, '-m', 'experiments.run', *run.args, f'--workdir={run.workdir}'])


def print_commands(runs: Sequence[Run], python: str = 'python', out=None, err=None) -> int:
  """One command per unfinished run on ``out`` (stdout), e.g. for a cluster array job;
  finished runs are named on ``err`` (stderr). Returns the number of commands printed."""
  out, err = out or sys.stdout, err or sys.stderr
  n = 0
  for run in runs:
    if run.finished:
      print(f'# finished, skipped: {run.workdir}', file=err)
      continue
    print(command(run, python), file=out)
    n += 1
  return n


def run_local(runs: Sequence[Run], train_fn: Callable | None = None,
              log: Callable[[str], None] | None = None) -> dict[str, str]:
  """Runs the unfinished runs one after another in this process.

  A run that fails with a MirrormetaError (e.g. non-finite loss) is reported and the sweep
  goes on; Ctrl-C (train.Interrupted) stops it (rerunning resumes the interrupted run).

  Args:
    runs: from :func:`plan`.
    train_fn: ``train_fn(config, workdir) -> results`` (default
      ``mirrormeta.train.train_and_evaluate``).
    log: where progress lines go (default: stderr).

  Returns:
    ``{name: 'skipped' | 'done' | 'failed: <message>'}``.
  """
  if train_fn is None:
    from mirrormeta import train  # pylint: disable=g-import-not-at-top
    train_fn = train.train_and_evaluate
  log = log or (lambda s: print(s, file=sys.stderr))
  status = {}
  for i, run in enumerate(runs, 1):
    head = f'[{i}/{len(runs)}] {run.name}'
    if run.finished:
      log(f'{head}: finished, skipped')
      status[run.name] = 'skipped'
      continue
    log(f'{head}: running in {run.workdir}')
    try:
      train_fn(run.config, run.workdir)
      status[run.name] = 'done'
    except MirrormetaError as e:
      message = str(e).replace('\n', ' ')
      log(f'{head}: failed: {message}')
      status[run.name] = f'failed: {message}'
  return status


# --------------------------------------------------------------------------- aggregation


def _read_json(path: Path) -> dict | None:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def collect(root: str | os.PathLike) -> tuple[list[dict], list[str]]:
  """Every run of a sweep root: its plan's runs in grid order, then other run folders.

  Returns:
    (rows, fields): one dict per run (name, workdir, status, values of the swept fields,
    results or None) and the swept fields (the plan's, or without a plan the config fields
    whose values differ between runs).
  """
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  root = Path(root).expanduser()
  if not root.is_dir():
    raise MirrormetaError(f'--root {root} does not exist')
  the_plan = read_plan(root)
  names = [r['name'] for r in the_plan['runs']] if the_plan else []
  planned = {r['name']: r['overrides'] for r in the_plan['runs']} if the_plan else {}
  others = sorted(p.name for p in root.iterdir()
                  if p.is_dir() and p.name not in planned
                  and ((p / RESULTS_FILE).is_file() or (p / 'config.json').is_file()))
  rows, configs = [], {}
  for name in names + others:
    workdir = root / name
    results = _read_json(workdir / RESULTS_FILE)
    config = _read_json(workdir / 'config.json')
    if config is not None:
      configs[name] = traverse_util.flatten_dict(config, sep='.')
    status = ('done' if results is not None else 'started' if config is not None
              else 'not started')
    rows.append({'name': name, 'workdir': workdir, 'status': status, 'results': results,
                 'overrides': planned.get(name, {})})
  if the_plan:
    fields = list(the_plan.get('fields') or [])
  else:
    keys = sorted(set().union(*configs.values())) if configs else []
    fields = [k for k in keys if k != 'name'
              and len({json.dumps(c.get(k)) for c in configs.values()}) > 1]
  for row in rows:
    flat = configs.get(row['name'], {})
    row['fields'] = {f: (flat[f] if f in flat else row['overrides'].get(f, '')) for f in fields}
  return rows, fields


def _fmt(v: Any) -> str:
  if isinstance(v, (list, tuple)):
    return '(' + ','.join(map(str, v)) + ')'
  return '' if v is None else str(v)


def _curve_name(metric: str) -> str:
  return 'accuracy' if metric == 'accuracy' else 'loss'


def table(rows: list[dict], fields: list[str]) -> tuple[list[str], list[list[Any]]]:
  """The CSV table: one row per run, final metric and its per-step curve."""
  max_k = max((len(r['results']['per_step']['step']) for r in rows if r['results']),
              default=0)
  header = ['run', 'status', *fields, 'metric', 'value', 'ci95', 'num_tasks', 'eval_inner_steps',
            'checkpoint', 'checkpoint_step', 'train_steps', 'train_wall_s', 'workdir']
  header += [f'k{k}' for k in range(max_k)] + [f'k{k}_ci95' for k in range(max_k)]
  body = []
  for r in rows:
    res = r['results'] or {}
    row = [r['name'], r['status'], *[_fmt(r['fields'][f]) for f in fields]]
    if res:
      metric = res['metric']
      curve = res['per_step'][_curve_name(metric)]
      ci = res['per_step'][_curve_name(metric) + '_ci95']
      row += [metric, res[metric], res[f'{metric}_ci95'], res['num_tasks'],
              res['inner_steps'], res['checkpoint']['which'], res['checkpoint']['step'],
              res.get('train', {}).get('steps', ''), res.get('train', {}).get('wall_s', '')]
      row += [str(r['workdir'])]
      row += list(curve) + [''] * (max_k - len(curve)) + list(ci) + [''] * (max_k - len(ci))
    else:
      row += [''] * 9 + [str(r['workdir'])] + [''] * (2 * max_k)
    body.append(row)
  return header, body


def markdown(rows: list[dict], fields: list[str], root: Path, the_plan: dict | None) -> str:
  """The sweep's report: one line per run with its final test metric ± 95% CI."""
  done = [r for r in rows if r['status'] == 'done']
  lines = [f'# Sweep {root}', '']
  if the_plan:
    over = ' '.join(the_plan.get('overrides') or [])
    lines += [f'`--config={the_plan["config"]}{" " + over if over else ""}`, grid '
              f'`{the_plan["sweep"]}`.', '']
  counts = {s: sum(r['status'] == s for r in rows) for s in ('done', 'started', 'not started')}
  lines += [f'{len(rows)} runs: ' + ', '.join(f'{n} {s}' for s, n in counts.items() if n)
            + '. Test metric of each run\'s checkpoint after K adaptation steps, ± 95% CI '
            'over its test tasks.', '']
  header = ['run', *fields, 'test metric', '± 95% CI', 'tasks', 'K', 'checkpoint',
            'train steps', 'train time (s)', 'status']
  lines += ['| ' + ' | '.join(header) + ' |',
            '|' + '---|' * (1 + len(fields)) + '---:|' * 7 + '---|']
  for r in rows:
    cells = [r['name'], *[_fmt(r['fields'][f]) for f in fields]]
    res = r['results']
    if res:
      metric = res['metric']
      unit = '%' if metric == 'accuracy' else ''
      name = 'accuracy' if metric == 'accuracy' else 'MSE'
      cells += [f'{name} {res[metric]:.2f}{unit}', f'{res[metric + "_ci95"]:.2f}{unit}',
                str(res['num_tasks']), str(res['inner_steps']),
                f'{res["checkpoint"]["which"]} @ {res["checkpoint"]["step"]}',
                str(res.get('train', {}).get('steps', '')),
                str(res.get('train', {}).get('wall_s', ''))]
    else:
      cells += [''] * 7
    cells.append(r['status'])
    lines.append('| ' + ' | '.join(cells) + ' |')
  if done:
    lines += ['', '![final test metric and per-step curves](sweep.png)']
  return '\n'.join(lines) + '\n'


def plot(rows: list[dict], path: str | os.PathLike) -> bool:
  """Final metric ± 95% CI per run, and every run's metric-vs-adaptation-step curve.

  Runs whose metric differs from the first finished run's are left out of the plot (they
  are in the tables). Returns False (nothing written) if no run has finished.
  """
  done = [r for r in rows if r['results']]
  if not done:
    return False
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mirrormeta import evaluate  # pylint: disable=g-import-not-at-top

  metric = done[0]['results']['metric']
  done = [r for r in done if r['results']['metric'] == metric]
  label = evaluate.metric_label(metric)
  n = len(done)
  fig, (bar, curves) = plt.subplots(1, 2, figsize=(11, max(3.5, 0.3 * n + 1.5)), dpi=120,
                                    gridspec_kw={'width_ratios': [1, 1.2]})
  y = np.arange(n)
  values = [r['results'][metric] for r in done]
  cis = [r['results'][f'{metric}_ci95'] for r in done]
  colors = [plt.cm.tab10(i % 10) for i in range(n)]
  bar.errorbar(values, y, xerr=cis, fmt='o', ecolor='gray', capsize=3, color='k')
  bar.scatter(values, y, c=colors, zorder=3)
  bar.set_yticks(y, [r['name'] for r in done], fontsize=7)
  bar.set_ylim(n - 0.5, -0.5)  # first run on top
  bar.set_xlabel(f'test {label} (± 95% CI)')
  bar.set_title('final', fontsize=9)
  bar.grid(alpha=0.3, axis='x')
  name = _curve_name(metric)
  for r, color in zip(done, colors):
    per = r['results']['per_step']
    k, m, ci = (np.asarray(per['step']), np.asarray(per[name]),
                np.asarray(per[f'{name}_ci95']))
    curves.plot(k, m, marker='o', ms=3, color=color, label=r['name'])
    curves.fill_between(k, m - ci, m + ci, color=color, alpha=0.15)
  curves.set_xlabel('adaptation step k')
  curves.xaxis.get_major_locator().set_params(integer=True)
  curves.set_title('after each adaptation step', fontsize=9)
  curves.set_ylabel(f'test {label}')
  curves.grid(alpha=0.3)
  curves.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, format='png')
  plt.close(fig)
  return True


def _atomic(path: Path, write: Callable[[Path], Any]) -> Any:
  tmp = path.with_name(path.stem + '.tmp' + path.suffix)
  out = write(tmp)
  if tmp.exists():
    os.replace(tmp, path)
  return out


def aggregate(root: str | os.PathLike) -> dict[str, Path]:
  """Writes ``sweep.md``, ``sweep.csv`` and (if a run finished) ``sweep.png`` into ``root``.

  Reads every run's ``results.json``; runs not finished yet appear with their status.

  Returns:
    {'markdown': path, 'csv': path, 'plot': path (absent if no run finished)}.
  """
  root = Path(root).expanduser()
  rows, fields = collect(root)
  if not rows:
    raise MirrormetaError(f'--root {root} holds no runs (no {PLAN_FILE}, no run folders)')
  header, body = table(rows, fields)
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator='\n')
  writer.writerow(header)
  writer.writerows(body)
  paths = {'markdown': root / 'sweep.md', 'csv': root / 'sweep.csv'}
  _atomic(paths['csv'], lambda p: p.write_text(buf.getvalue()))
  _atomic(paths['markdown'], lambda p: p.write_text(markdown(rows, fields, root,
                                                             read_plan(root))))
  png = root / 'sweep.png'
  if _atomic(png, lambda p: plot(rows, p)):
    paths['plot'] = png
  return paths
