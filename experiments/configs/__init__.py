"""Named experiment configs: one ``<name>.py`` per setting, each with ``get_config()``.

``python -m experiments.run --config=<name>`` resolves a bare name to ``<name>.py`` here;
:func:`available` lists the names.
"""
import importlib.util
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
_NOT_CONFIGS = ('__init__', 'base', 'stored')  # helpers, not named configs


def available() -> list[str]:
  """Sorted names of the named configs in this folder."""
  return sorted(p.stem for p in CONFIG_DIR.glob('*.py') if p.stem not in _NOT_CONFIGS)


def path_of(name: str) -> Path | None:
  """The file of named config ``name``, or None if there is none."""
  path = CONFIG_DIR / f'{name}.py'
  return path if name not in _NOT_CONFIGS and path.is_file() else None


def get(name: str):
  """The ConfigDict of named config ``name`` (``get_config()`` of its file)."""
  path = path_of(name)
  if path is None:
    raise ValueError(f'no named config {name!r}; available: {", ".join(available())}')
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
