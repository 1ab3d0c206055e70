"""One error type for bad input, so callers can catch it and users see one clear line."""


class MirrormetaError(ValueError):
  """Bad input to mirrormeta: the message names the problem and the fix."""
