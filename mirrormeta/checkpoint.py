"""A run's folder: its config guard and its orbax checkpoints (latest and best-validation).

Layout of a workdir::

  config.json            the run's config (written before anything else)
  checkpoints/latest/N   TrainState after step N (the newest ``keep`` are kept)
  checkpoints/best/N     TrainState with the best validation metric so far
  tensorboard/           scalars (mirrormeta.train)
  results.json, results.md, <metric>_vs_step.png   (mirrormeta.evaluate)

A rerun in the same workdir resumes it; a different config there is refused before
anything is written (:func:`check_workdir`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from mirrormeta.errors import MirrormetaError

PyTree = Any
CONFIG_FILE = 'config.json'

# Fields that do not change what a run computes (its training trajectory): a workdir may be
# resumed or re-evaluated with other values. num_steps may be raised to extend a run;
# evaluation and bookkeeping fields change only what is measured or how it is executed.
FREE_FIELDS = frozenset({
    'name', 'num_steps', 'data_dir', 'cache_dir', 'eval_query', 'eval_inner_steps',
    'val_tasks', 'val_curve', 'test_tasks', 'eval_batch', 'eval_checkpoint', 'eval_every',
    'log_every', 'checkpoint_every', 'keep_checkpoints', 'strategy', 'num_devices',
    'distributed', 'progress', 'retain_freed_memory', 'low_memory_schedule',
    'threaded_convolutions', 'synchronous_dispatch', 'compile_ahead',
})


def config_dict(config) -> dict:
  """The config as plain JSON data (tuples become lists)."""
  return json.loads(config.to_json()) if hasattr(config, 'to_json') else json.loads(
      json.dumps(config))


def config_differences(stored: dict, config: dict) -> list[str]:
  """``'field: new vs stored'`` for every run-defining field that differs.

  Fields absent from the stored config (added to the configs after the run started) are
  not compared.
  """
  a, b = (traverse_util.flatten_dict(c, sep='.') for c in (stored, config))
  diffs = []
  for key in sorted(set(a) | set(b)):
    if key.split('.')[0] in FREE_FIELDS or key not in a:
      continue
    if a.get(key, '<absent>') != b.get(key, '<absent>'):
      diffs.append(f'{key}: {b.get(key, "<absent>")!r} here vs {a.get(key, "<absent>")!r} there')
  return diffs


def read_config(workdir: str | os.PathLike) -> dict | None:
  """The config stored in ``workdir`` (None if it has none)."""
  path = Path(workdir) / CONFIG_FILE
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise MirrormetaError(f'cannot read {path} ({e}); it is not a mirrormeta run config') from None


def check_workdir(workdir: str | os.PathLike, config, *, must_exist: bool = False) -> bool:
  """Refuses a workdir that holds something else than a run of ``config``; writes nothing.

  Args:
    workdir: the run's folder.
    config: the config about to run there.
    must_exist: require a run there (evaluation of a checkpoint).

  Returns:
    True if ``workdir`` holds a run of this config (resume), False if it is new or empty.

  Raises:
    MirrormetaError: workdir is a file; not empty and not a mirrormeta run; holds a run of
      a different config (naming the differing fields); or (must_exist) holds no run.
  """
  workdir = Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise MirrormetaError(f'--workdir {workdir} is a file, not a folder')
  stored = read_config(workdir)
  if stored is None:
    if must_exist:
      raise MirrormetaError(f'{workdir} holds no trained run ({CONFIG_FILE} missing); train '
                            'one there first')
    if workdir.is_dir() and any(workdir.iterdir()):
      raise MirrormetaError(f'--workdir {workdir} is not empty and holds no mirrormeta run '
                            f'({CONFIG_FILE} missing); use a new or empty folder')
    return False
  diffs = config_differences(stored, config_dict(config))
  if diffs:
    more = f' (and {len(diffs) - 3} more)' if len(diffs) > 3 else ''
    raise MirrormetaError(
        f'--workdir {workdir} holds a run of a different config ({"; ".join(diffs[:3])}'
        f'{more}); use another --workdir, or the same config to resume it')
  return True


def write_config(workdir: str | os.PathLike, config) -> Path:
  """Writes the config to ``workdir/config.json`` (atomically)."""
  path = Path(workdir) / CONFIG_FILE
  tmp = path.with_name(CONFIG_FILE + '.tmp')
  tmp.write_text(json.dumps(config_dict(config), indent=2, sort_keys=True) + '\n')
  os.replace(tmp, path)
  return path


class Checkpoints:
  """The latest and best-validation TrainStates of a run, as two orbax CheckpointManagers.

  Saving is asynchronous (orbax copies the arrays, then writes in the background); a
  checkpoint appears on disk only once completely written, so a crash leaves the previous
  ones intact. Every process must make the same calls (orbax coordinates multi-host saves).
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 2, best_mode: str = 'max'):
    self.directory = Path(directory).absolute()
    # Two managers save concurrently (often at the same step): each needs its own barrier
    # names across processes, or one's barrier pairs with the other's and a process hangs
    # in its commit until the distributed shutdown barrier aborts the run.
    sync = lambda name: ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)
    self._latest = ocp.CheckpointManager(
        self.directory / 'latest', options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, multiprocessing_options=sync('latest')))
    self._best = ocp.CheckpointManager(
        self.directory / 'best',
        options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m['value'],
                                             best_mode=best_mode,
                                             multiprocessing_options=sync('best')))

  def _manager(self, which: str) -> ocp.CheckpointManager:
    if which not in ('latest', 'best'):
      raise MirrormetaError(f"checkpoint must be 'latest' or 'best', got {which!r}")
    return self._latest if which == 'latest' else self._best

  def step(self, which: str) -> int | None:
    """The step of the newest 'latest' or of the 'best' checkpoint (None if none)."""
    m = self._manager(which)
    return m.latest_step() if which == 'latest' else m.best_step()

  def path(self, which: str, step: int) -> Path:
    return self.directory / which / str(step)

  def save_latest(self, step: int, state: PyTree) -> bool:
    """Saves ``state`` as the latest checkpoint of ``step`` (no-op if it exists)."""
    if step in self._latest.all_steps():
      return False
    return self._latest.save(step, args=ocp.args.StandardSave(state))

  def save_best(self, step: int, state: PyTree, value: float) -> bool:
    """Offers ``state`` with validation metric ``value``; orbax keeps the best one."""
    if step in self._best.all_steps():
      return False
    return self._best.save(step, args=ocp.args.StandardSave(state),
                           metrics={'value': float(value)})

  def best_value(self) -> float | None:
    step = self._best.best_step()
    if step is None:
      return None
    metrics = self._best.metrics(step)
    return None if not metrics else float(metrics['value'])

  def restore(self, which: str, template: PyTree, step: int | None = None) -> PyTree:
    """Restores a checkpoint into the structure, dtypes and shardings of ``template``."""
    m = self._manager(which)
    self.wait()
    step = self.step(which) if step is None else step
    if step is None:
      raise MirrormetaError(f'no {which} checkpoint in {self.directory}')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    try:
      return m.restore(step, args=ocp.args.StandardRestore(abstract))
    except (ValueError, KeyError, TypeError) as e:
      raise MirrormetaError(
          f'checkpoint {self.path(which, step)} does not match this config\'s model and '
          f'algorithm ({type(e).__name__}: {str(e).splitlines()[0][:200]})') from None

  def wait(self) -> None:
    self._latest.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    self._latest.close()
    self._best.close()
