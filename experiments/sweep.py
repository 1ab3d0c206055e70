r"""Run a grid of configs, or print one command per run, and aggregate their results.

    python -m experiments.sweep --config=smoke \
        --sweep='algorithm=maml,metamida; inner_steps=1,5' [--config.num_steps=200] \
        [--root=runs/sweep_smoke] [--mode=local|print|aggregate]

``--sweep``: axes separated by ';', each ``field=value[,value...]`` (nested fields as
``optimizer.lr``; a value holding commas goes in brackets: ``mlp_hidden=(40,40),(64,64)``).
The runs are the cartesian product; run ``algorithm=maml,inner_steps=5`` lives in
``<root>/algorithm=maml,inner_steps=5`` and is exactly::

    python -m experiments.run --config=smoke [--config.num_steps=200] \
        --config.algorithm=maml --config.inner_steps=5 --workdir=<root>/algorithm=maml,inner_steps=5

Modes: ``local`` (default) trains the runs one after another in this process, skipping
finished ones (those with results.json; an unfinished one resumes), then aggregates; a run
failing with a MirrormetaError (e.g. a non-finite loss) is reported and the others go on.
``print`` writes one such command per unfinished run to stdout, for a cluster array job
(e.g. line ``$SLURM_ARRAY_TASK_ID`` of the file; a multi-host run is its command started on
every host); run ``--mode=aggregate`` once they are done. ``aggregate`` only reads
``<root>/*/results.json`` and writes ``<root>/sweep.md``, ``sweep.csv`` and ``sweep.png``
(final test metric ± 95% CI per run; metric against the adaptation step for every run).

Overrides for every run take the form ``--config.<field>=<value>`` (with ``=``). Every
run's config is built and checked first (the runner's parser, config checks and workdir
guard): bad input prints one ``error: ...`` line and exits with status 2 before anything
runs. The default root is ``runs/sweep_<config name>``; ``sweep.json`` there records the
plan, so aggregation also lists runs not started yet.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import configs
from experiments import run as runner
from mirrormeta import sweep
from mirrormeta.errors import MirrormetaError

_SWEEP = flags.DEFINE_string(
    'sweep', None, "the grid: 'field=v1,v2; other.field=v3,v4' (cartesian product)")
_ROOT = flags.DEFINE_string(
    'root', None, 'folder of the sweep: one subfolder per run, and sweep.{json,md,csv,png} '
    '(default: runs/sweep_<config name>)')
_MODE = flags.DEFINE_enum(
    'mode', 'local', ['local', 'print', 'aggregate'],
    'local: run here one after another; print: one experiments.run command per unfinished '
    'run; aggregate: only write sweep.md/csv/png from the runs found in --root')
_PYTHON = flags.DEFINE_string('python', 'python', 'the interpreter in printed commands')

# The runner's one-line error output and its reading of ConfigDict's unknown-field errors.
_fail = runner._fail  # pylint: disable=protected-access
_unknown_field_message = runner._unknown_field_message  # pylint: disable=protected-access

_CONFIG_ARGS: list[str] = []  # --config=... and --config.x=y, kept apart from absl's flags


def load_config(args: list[str]):
  """The runner's own parsing of ``--config=<name|file> --config.x=y ...`` → ConfigDict.

  Same name resolution, typed overrides and one-line messages as ``experiments.run``.
  """
  try:
    argv = runner.resolve_argv(['experiments.run', *args])
  except runner.UsageError as e:
    raise MirrormetaError(str(e)) from None
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file('config', None, '', flag_values=values,
                                           lock_config=True, sys_argv=argv)
  try:
    values(argv)
  except flags.Error as e:
    raise MirrormetaError(str(e).splitlines()[0]) from None
  except (KeyError, AttributeError) as e:  # --config.<unknown field>=...
    raise MirrormetaError(_unknown_field_message(e, argv)) from None
  return holder.value


def parse_flags(argv: list[str]) -> list[str]:
  """absl flags, with --config and its overrides set aside for the runner's parser."""
  rest = [argv[0]]
  i = 1
  while i < len(argv):
    arg = argv[i]
    if arg == '--':
      rest += argv[i:]
      break
    if arg == '--config' and i + 1 < len(argv):
      _CONFIG_ARGS.append(f'--config={argv[i + 1]}')
      i += 2
      continue
    if arg.startswith(('--config=', '--config.', '-config.', '--noconfig.')):
      _CONFIG_ARGS.append(arg)
    else:
      rest.append(arg)
    i += 1
  try:
    return flags.FLAGS(rest)
  except flags.Error as e:
    _fail(str(e).splitlines()[0])


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {" ".join(argv[1:])}; flags look like --sweep=...')
  logging.set_verbosity(logging.WARNING)
  mode = _MODE.value
  configs = [a for a in _CONFIG_ARGS if a.startswith('--config=')]
  overrides = [a for a in _CONFIG_ARGS if not a.startswith('--config=')]
  try:
    if mode == 'aggregate':
      if _ROOT.value is None:
        raise MirrormetaError('--mode=aggregate needs --root (the folder of the sweep)')
      if _CONFIG_ARGS or _SWEEP.value:
        raise MirrormetaError('--mode=aggregate reads --root only; drop --config and --sweep')
      _report(sweep.aggregate(_ROOT.value))
      return
    if len(configs) != 1:
      raise MirrormetaError('pass one --config=<name or file> (available: '
                            f'{", ".join(configs.available())})')
    if not _SWEEP.value:
      raise MirrormetaError("pass --sweep='field=v1,v2; other=v3,v4'")
    config_arg = configs[0][len('--config='):]
    if mode == 'local':
      import jax  # pylint: disable=g-import-not-at-top
      if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
        jax.config.update('jax_compilation_cache_dir',
                          str(Path('~/.cache/mirrormeta/jax').expanduser()))
    name = load_config(configs).name
    root = Path(_ROOT.value or os.path.join('runs', f'sweep_{name}'))
    runs = sweep.plan(config_arg, overrides, _SWEEP.value, root, load_config)
    if mode == 'local' and (os.environ.get('MIRRORMETA_COORDINATOR') or any(
        r.config.distributed.coordinator_address or r.config.distributed.auto for r in runs)):
      raise MirrormetaError('--mode=local runs every run in this one process; for multi-process '
                            'runs use --mode=print and start each command on every host')
    sweep.write_plan(root, runs, _SWEEP.value, config_arg, overrides)
    if mode == 'print':
      n = sweep.print_commands(runs, _PYTHON.value)
      print(f'# {n} of {len(runs)} runs to go; afterwards: python -m experiments.sweep '
            f'--mode=aggregate --root={root}', file=sys.stderr)
      return
    from mirrormeta import train  # pylint: disable=g-import-not-at-top
    try:
      status = sweep.run_local(runs)
    except train.Interrupted as e:
      print(e.message, file=sys.stderr)
      print('sweep interrupted; rerun the same command to go on', file=sys.stderr)
      sys.exit(runner.EXIT_INTERRUPTED)
    _report(sweep.aggregate(root))
    failed = [n for n, s in status.items() if s.startswith('failed')]
    if failed:
      print(f'{len(failed)} of {len(runs)} runs failed: {", ".join(failed)}', file=sys.stderr)
      sys.exit(1)
  except MirrormetaError as e:
    _fail(str(e).replace('\n', ' '))
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    sys.exit(runner.EXIT_INTERRUPTED)


def _report(paths: dict) -> None:
  print(f'sweep report: {paths["markdown"]}, {paths["csv"]}'
        + (f', {paths["plot"]}' if 'plot' in paths else ' (no finished run to plot)'))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
