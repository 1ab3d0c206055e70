"""Named experiment configs: one ``<name>.py`` per setting, each with ``get_config()``.

``python -m experiments.run --config=<name>`` resolves a bare name to ``<name>.py`` here;
:func:`available` lists the names.
"""
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
