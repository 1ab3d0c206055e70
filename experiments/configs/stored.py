"""The config stored in a run's workdir, so a run can be resumed or re-tested by its folder.

    python -m experiments.run --workdir=runs/mini_1shot [--eval_only] [--config.test_tasks=600]

experiments/run.py uses this file (``--config=.../stored.py:<workdir>``) when --workdir is
given without --config; overrides apply as with any config.
"""
import json
from pathlib import Path

from experiments.configs import base


def _update(config, values: dict) -> None:
  """Sets ``values`` into ``config``, keeping its field types (lists back to tuples)."""
  for key, value in values.items():
    current = config.get(key) if key in config else None
    if isinstance(value, dict) and key in config:
      _update(config[key], value)
    elif isinstance(value, list) and isinstance(current, tuple):
      config[key] = tuple(value)
    else:
      config[key] = value


def get_config(workdir: str):
  path = Path(workdir).expanduser() / 'config.json'
  stored = json.loads(path.read_text())
  config = base.get_config(stored.get('dataset', 'miniimagenet'))
  _update(config, stored)
  return config
