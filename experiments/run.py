r"""Meta-train, validate, checkpoint, test and report one config; or test a trained run.

    python -m experiments.run --config=mini_1shot [--workdir=runs/mini_1shot] \
        [--config.algorithm=maml] [--config.data_dir=~/data/miniimagenet] ...
    python -m experiments.run --config=path/to/my_config.py --workdir=...
    python -m experiments.run --workdir=runs/mini_1shot                # resume it
    python -m experiments.run --workdir=runs/mini_1shot --eval_only    # test it again

``--config`` is a named config (``experiments/configs/<name>.py``; see each file's
docstring) or the path of a config file; ``--config.<field>=<value>`` overrides a field
(see experiments/configs/base.py). Without ``--config``, the config stored in the workdir is
used. The default workdir is ``runs/<name>_<algorithm>``; rerunning the same command in a
workdir resumes it exactly; a different config there is refused.

Bad input (unknown config or field, wrong-typed value, impossible setting, missing data,
workdir of another run) prints one ``error: ...`` line and exits with status 2; Ctrl-C
saves a checkpoint and exits with status 130.

Compiled programs are cached in $JAX_COMPILATION_CACHE_DIR (default
~/.cache/mirrormeta/jax), so a rerun of the same config skips most compilation.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import configs

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'a named config (' + ', '.join(configs.available()) + ') or the path of '
    'a config file; --config.<field>=<value> overrides a field', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'folder of the run (default: runs/<name>_<algorithm>); an existing run '
    'there is resumed')
_EVAL_ONLY = flags.DEFINE_bool(
    'eval_only', False, "only test the workdir's checkpoint (config.eval_checkpoint: best or "
    'latest) and rewrite its report')

EXIT_ERROR, EXIT_INTERRUPTED = 2, 130


class UsageError(Exception):
  """Bad command line; the message is the one line the user sees."""


def _fail(message: str, code: int = EXIT_ERROR):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(code)


def resolve_config_name(value: str) -> str:
  """``mini_1shot`` → ``.../experiments/configs/mini_1shot.py``; a path is kept.

  A value naming a ``.py`` file or holding a path separator is a path (with an optional
  ``:arg`` suffix passed to ``get_config``); anything else is a config name.
  """
  target, sep, arg = value.partition(':')
  if target.endswith('.py') or os.sep in target or '/' in target:
    if not Path(target).expanduser().is_file():
      raise UsageError(f'config file {target} not found')
    return str(Path(target).expanduser()) + sep + arg
  path = configs.path_of(target)
  if path is None:
    raise UsageError(f'unknown config {target!r}; available: {", ".join(configs.available())} '
                     '(or the path of a config file)')
  return str(path) + sep + arg


def resolve_argv(argv: list[str]) -> list[str]:
  """Rewrites a bare ``--config=<name>`` (or ``--config <name>``) to its file's path.

  Without --config, a --workdir holding a run supplies its stored config
  (experiments/configs/stored.py), so overrides work there too.
  """
  out, i, has_config, workdir = list(argv), 1, False, None
  while i < len(out):
    arg = out[i]
    if arg == '--':
      break
    if arg.startswith('--config='):
      out[i] = '--config=' + resolve_config_name(arg[len('--config='):])
      has_config = True
    elif arg == '--config' and i + 1 < len(out):
      out[i + 1] = resolve_config_name(out[i + 1])
      has_config = True
      i += 1
    elif arg.startswith('--workdir='):
      workdir = arg[len('--workdir='):]
    elif arg == '--workdir' and i + 1 < len(out):
      workdir = out[i + 1]
    i += 1
  if not has_config and workdir:
    stored = Path(workdir).expanduser()
    if not (stored / 'config.json').is_file():
      raise UsageError(f'{workdir} holds no run (config.json missing); pass --config=<name '
                       'or file> to start one')
    out.insert(1, f'--config={configs.CONFIG_DIR / "stored.py"}:{stored}')
  return out


def _unknown_field_message(error: Exception, argv: list[str]) -> str:
  """'unknown config field ...' from ConfigDict's KeyError/AttributeError text."""
  text = str(error)
  key = re.search(r'[A-Za-z_][A-Za-z0-9_]*', text)
  key = key.group(0) if key else text
  hint = re.search(r'Did you mean "([^"]+)"', text)
  flag = next((a.split('=')[0] for a in argv if a.startswith('--config.')
               and a.split('=')[0].rsplit('.', 1)[-1] == key), None)
  return (f'unknown config field {key!r}' + (f' in {flag}' if flag else '')
          + (f' (did you mean {hint.group(1)!r}?)' if hint else ''))


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with config-name resolution; bad input → one line, exit 2."""
  try:
    argv = sys.argv = resolve_argv(argv)  # config_flags reads the overrides from sys.argv
    return flags.FLAGS(argv)
  except UsageError as e:
    _fail(str(e))
  except flags.Error as e:
    _fail(str(e).splitlines()[0])
  except (KeyError, AttributeError) as e:  # --config.<unknown field>=...
    _fail(_unknown_field_message(e, argv))


def load_config():
  """The --config (with overrides); without one, run.resolve_argv used the workdir's."""
  if _CONFIG.value is None:
    raise UsageError('pass --config=<name or file> (available: '
                     f'{", ".join(configs.available())}) or the --workdir of a run')
  return _CONFIG.value


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {" ".join(argv[1:])}; flags look like --config=<name>')
  logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    jax.config.update('jax_compilation_cache_dir',
                      str(Path('~/.cache/mirrormeta/jax').expanduser()))
  from mirrormeta import MirrormetaError, parallel, runtime, train  # pylint: disable=g-import-not-at-top
  try:
    config = load_config()
    # All of these before anything below starts the JAX backend; a device count already
    # given (XLA_FLAGS, JAX_NUM_CPU_DEVICES) is kept.
    if runtime.explicit_cpu_devices() is None and train.cpu_devices(config) > 1:
      runtime.cpu_devices(train.cpu_devices(config))
    if config.get('low_memory_schedule', False):
      runtime.low_memory_schedule()
    if config.get('threaded_convolutions', False):
      runtime.threaded_convolutions()
    if config.get('synchronous_dispatch', True):
      runtime.synchronous_dispatch()
    parallel.maybe_initialize_distributed(config)
    # Multi-process runs too: the orbax commit-barrier timeout once seen with it on came from
    # the two checkpoint managers' colliding barrier names (fixed in checkpoint.py).
    if config.get('retain_freed_memory', True):
      runtime.retain_freed_memory()
    workdir = _WORKDIR.value or os.path.join('runs', f'{config.name}_{config.algorithm}')
    if _EVAL_ONLY.value:
      results = train.evaluate_checkpoint(config, workdir)
    else:
      results = train.train_and_evaluate(config, workdir)
  except UsageError as e:
    _fail(str(e))
  except MirrormetaError as e:  # includes data.DataError
    _fail(str(e).replace('\n', ' '))
  except train.Interrupted as e:
    print(e.message, file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)
  except KeyboardInterrupt:  # before training started: nothing to save
    print('interrupted', file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)
  if parallel.is_main_process():
    metric = results['metric']
    unit = '%' if metric == 'accuracy' else ''
    print(f'{results["name"]} {results["algorithm"]}: test {metric} '
          f'{results[metric]:.2f}{unit} ± {results[metric + "_ci95"]:.2f}{unit} '
          f'({results["num_tasks"]} tasks, K={results["inner_steps"]}); report in '
          f'{Path(workdir) / "results.md"}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
