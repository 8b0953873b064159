"""Shared plumbing of the ``launch/`` entry points."""

from __future__ import annotations

import functools
import sys
from typing import Callable

from tanuki.config import ConfigError


def user_errors(*extra: type[BaseException]) -> Callable:
    """Decorate a Hydra task so that user mistakes end with one clear line and exit status 2.

    Configuration errors (and the given exception types, e.g. a missing input file) are the user's to
    fix: a traceback would only hide the message that names the key or the file. ``KeyboardInterrupt``
    ends with one line and exit status 130 (128 + SIGINT, as a shell reports it).
    """
    caught = (ConfigError, *extra)

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except caught as e:
                print(f"error: {e}", file=sys.stderr)
                raise SystemExit(2) from None
            except KeyboardInterrupt:
                # A second Ctrl-C during training, or one elsewhere: one line, not a traceback.
                print("aborted by Ctrl-C (the last complete checkpoint, if any, is kept)", file=sys.stderr)
                raise SystemExit(130) from None

        return inner

    return wrap
