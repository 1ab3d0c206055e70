"""Evaluation on held-out tasks: the query metric after every adaptation step 0..K, its mean
and 95% confidence interval, and the report files (results.json, results.md, a PNG plot).

For each test task, K mirror steps on the support set from θ (no meta-update) and the query
accuracy (classification) or MSE (regression) after each step k = 0..K: the paper's
Figure 2 curve. With n tasks, mean ± 1.96·std/√n is the usual few-shot 95% interval
(std over tasks, ddof=0, as in the MetaMiDA authors' code).
"""
from __future__ import annotations

import functools
import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import mirrormeta as mm

PyTree = Any
Z95 = 1.96
RESULT_FILES = ('results.json', 'results.md')


def task_batch_fn(sample: Callable) -> Callable:
  """Jitted ``(key, start, size) -> (support, query)``: tasks start..start+size-1 of a stream.

  Task i is drawn from its own key ``fold_in(key, i)`` (as ``mirrormeta.parallel
  .sample_tasks`` does), so a task does not depend on the batch it is drawn in: the same
  test tasks for any eval batch size, the same training tasks for any number of processes.

  Args:
    sample: ``sample(key, batch_size) -> Episode`` (``EpisodeSampler.sample``).
  """
  @functools.partial(jax.jit, static_argnums=2)
  def draw(key, start, size):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(start + jnp.arange(size))
    ep = jax.tree.map(lambda x: x[:, 0], jax.vmap(lambda k: sample(k, 1))(keys))
    return (ep.support_x, ep.support_y), (ep.query_x, ep.query_y)
  return draw


def make_eval_fn(h_star: Callable, loss_fn: Callable, *, steps: int, lr: Any,
                 strategy: mm.Strategy, classification: bool,
                 curve: bool = True) -> Callable:
  """Jitted ``(theta, support, query) -> {'loss': [B, K+1], 'accuracy': [B, K+1]}``.

  Query loss (and accuracy for classification) of each task after every step 0..K of
  adaptation on its support set; ``accuracy`` is absent for regression. With
  ``curve=False``, after step K only (``[B, 1]``): the query set is then evaluated once
  instead of K+1 times (mini_1shot's validation, 25 tasks: 706 instead of 2,507 GFLOP).
  """
  def fn(theta, support, query):
    _, per_task = mm.meta_loss(theta, support, query, h_star=h_star, loss_fn=loss_fn,
                               steps=steps, lr=lr, strategy=strategy, track_query=curve)
    suffix = '_per_step' if curve else ''
    names = ('loss', 'accuracy') if classification else ('loss',)
    return {n: per_task[f'query_{n}{suffix}'].reshape(per_task['query_loss'].shape[0], -1)
            for n in names}
  return jax.jit(fn)


def evaluate(eval_fn: Callable, theta: PyTree, draw: Callable, key: jax.Array,
             num_tasks: int, batch_size: int, progress: Callable | None = None
             ) -> dict[str, np.ndarray]:
  """Runs ``eval_fn`` on tasks 0..num_tasks-1 of the stream ``key``.

  Args:
    eval_fn: from :func:`make_eval_fn`.
    theta: MetaParams.
    draw: from :func:`task_batch_fn`.
    key: the task stream (e.g. the test key).
    num_tasks: tasks to evaluate; the last batch is trimmed.
    batch_size: tasks per call.
    progress: optional ``progress(iterable) -> iterable`` (e.g. a tqdm factory).

  Returns:
    {'loss': [num_tasks, K+1], 'accuracy': [num_tasks, K+1] (classification)} on the host.
  """
  starts = range(0, num_tasks, batch_size)
  outs = []
  for start in (progress(starts) if progress else starts):
    support, query = draw(key, start, batch_size)
    outs.append(eval_fn(theta, support, query))  # async: fetched together below
  outs = jax.device_get(outs)
  return {k: np.concatenate([o[k] for o in outs])[:num_tasks] for k in outs[0]}


def read_scalars(workdir: str | os.PathLike) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} of a run's TensorBoard scalars (``workdir/tensorboard``), read
  from its TFRecord event files without TensorFlow; later files win for a repeated step."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out = {}
  for path in sorted((Path(workdir) / 'tensorboard').glob('events.out.tfevents.*')):
    raw = path.read_bytes()
    i = 0
    while i < len(raw):  # records: length (8 bytes), its CRC (4), data, the data's CRC (4)
      (n,) = struct.unpack('<Q', raw[i:i + 8])
      event = event_pb2.Event.FromString(raw[i + 12:i + 12 + n])
      i += 12 + n + 4
      for v in event.summary.value:
        out.setdefault(v.tag, {})[event.step] = v.simple_value
  return out


def ci95(x: np.ndarray, axis: int = 0) -> np.ndarray:
  """Half-width of the 95% confidence interval of the mean: 1.96·std/√n."""
  x = np.asarray(x, np.float64)
  return Z95 * x.std(axis=axis) / math.sqrt(x.shape[axis])


def summarize(per_task: dict[str, np.ndarray], metric: str,
              steps: list[int] | None = None) -> dict:
  """Mean and 95% CI per step of every per-task curve, and of ``metric`` at the last step.

  Accuracies are reported in percent. ``steps`` labels the curves' columns (default
  0..K; ``[K]`` for an evaluation after step K only).

  Returns:
    {metric: final mean, f'{metric}_ci95': final CI, 'per_step': {'step': [0..K],
    name: [K+1] means, f'{name}_ci95': [K+1] CIs for every curve}}.
  """
  per_step = {}
  for name, x in per_task.items():
    scale = 100.0 if name == 'accuracy' else 1.0
    per_step[name] = np.round(scale * np.asarray(x, np.float64).mean(0), 6).tolist()
    per_step[f'{name}_ci95'] = np.round(scale * ci95(x), 6).tolist()
  k = len(next(iter(per_task.values()))[0])
  source = 'accuracy' if metric == 'accuracy' else 'loss'
  return {metric: per_step[source][-1], f'{metric}_ci95': per_step[f'{source}_ci95'][-1],
          'per_step': {'step': list(range(k)) if steps is None else list(steps),
                       **per_step}}


def metric_label(metric: str) -> str:
  return 'accuracy (%)' if metric == 'accuracy' else 'query MSE'


def write_report(workdir: str | os.PathLike, results: dict) -> dict[str, Path]:
  """Writes results.json, results.md and ``<metric>_vs_step.png`` into ``workdir``.

  Each file is written to a temporary name and renamed, so a report is never half written.

  Args:
    workdir: the run's folder.
    results: as built by :func:`mirrormeta.train.evaluate_checkpoint` (the keys used
      here: name, algorithm, dataset, n_way, shot, metric, <metric>, <metric>_ci95,
      num_tasks, inner_steps, checkpoint, per_step).

  Returns:
    {'json': path, 'markdown': path, 'plot': path}.
  """
  workdir = Path(workdir)
  metric = results['metric']
  paths = {'json': workdir / 'results.json', 'markdown': workdir / 'results.md',
           'plot': workdir / f'{metric}_vs_step.png'}
  _atomic_write(paths['json'], json.dumps(results, indent=2) + '\n')
  _atomic_write(paths['markdown'], markdown(results))
  tmp = paths['plot'].with_name(paths['plot'].stem + '.tmp.png')
  plot(results, tmp)
  os.replace(tmp, paths['plot'])
  return paths


def _atomic_write(path: Path, text: str) -> None:
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(text)
  os.replace(tmp, path)


def title(results: dict) -> str:
  setting = (f'{results["shot"]}-shot regression' if results['metric'] != 'accuracy'
             else f'{results["n_way"]}-way {results["shot"]}-shot')
  return f'{results["algorithm"]} on {results["dataset"]}, {setting}'


def markdown(results: dict) -> str:
  """The report as markdown: the headline number and a table over adaptation steps."""
  metric = results['metric']
  unit = '%' if metric == 'accuracy' else ''
  ck = results['checkpoint']
  lines = [
      f'# {results["name"]}: {title(results)}', '',
      f'Test {"accuracy" if metric == "accuracy" else "query MSE"} after '
      f'K={results["inner_steps"]} steps: '
      f'**{results[metric]:.2f}{unit} ± {results[metric + "_ci95"]:.2f}{unit}** '
      f'(95% CI over {results["num_tasks"]} tasks; {ck["which"]} checkpoint, step '
      f'{ck["step"]}).', '',
  ]
  if results['num_tasks'] < 600:
    lines[-1:-1] = [f'(Only {results["num_tasks"]} tasks: papers report >= 600; raise '
                    '--config.test_tasks for a comparable number.)', '']
  per = results['per_step']
  header = ['step k', metric_label(metric), '± 95% CI']
  cols = [per['accuracy'], per['accuracy_ci95']] if metric == 'accuracy' else [
      per['loss'], per['loss_ci95']]
  if metric == 'accuracy':
    header.append('query loss')
    cols.append(per['loss'])
  lines += ['| ' + ' | '.join(header) + ' |', '|' + '---:|' * len(header)]
  for k in per['step']:
    lines.append('| ' + ' | '.join([str(k)] + [f'{c[k]:.4f}' if metric != 'accuracy' or i == 2
                                                 else f'{c[k]:.2f}'
                                                 for i, c in enumerate(cols)]) + ' |')
  return '\n'.join(lines) + '\n'


def plot(results: dict, path: str | os.PathLike) -> None:
  """Query metric ± 95% CI against the adaptation step 0..K (the paper's Figure 2)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  metric = results['metric']
  per = results['per_step']
  name = 'accuracy' if metric == 'accuracy' else 'loss'
  k, y, ci = np.array(per['step']), np.array(per[name]), np.array(per[f'{name}_ci95'])
  fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
  ax.plot(k, y, marker='o', label=results['algorithm'])
  ax.fill_between(k, y - ci, y + ci, alpha=0.25)
  ax.set_xlabel('adaptation step k')
  ax.set_ylabel(f'test {metric_label(metric)}')
  ax.set_xticks(k)
  ax.set_title(title(results), fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, format='png')
  plt.close(fig)
