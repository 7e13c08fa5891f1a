"""From a checkout, installed packages come before the repository's own folders on ``sys.path``.

``python -m ...``, ``python -c``, a REPL and ``python -m pytest`` put the current folder first on
``sys.path``.  At the repository root that makes the owner's folders ``kernels/`` and ``dist/``
importable as the bare packages ``kernels`` and ``dist``, ahead of site-packages, where PyPI packages of
those names live.  transformers 5.25 depends on Hugging Face's ``kernels`` and imports it on
``import transformers``: from the root it got ``kernels/`` instead and failed.  Our code never uses the
bare names (its packages are ``opt_core.kernels`` and ``opt_core.dist``, DESIGN.md's layout), so the
root moves behind every other entry.  It stays on the path for what only runs from a checkout: ``bench``
and the tests.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def checkout_root() -> Path | None:
    """The repository root when ``opt_core`` runs from a checkout (plain or editable), else None.

    A wheel installs ``kernels`` inside ``opt_core/``; a checkout keeps ``kernels/`` beside it."""
    return None if (_PACKAGE_DIR / "kernels").is_dir() else _PACKAGE_DIR.parent


def _is(entry: str, root: Path) -> bool:
    try:
        return Path(entry or os.curdir).resolve() == root  # "" is the current folder
    except (OSError, RuntimeError):  # an entry that cannot be resolved is not the root
        return False


def put_checkout_root_last() -> None:
    """Move every ``sys.path`` entry naming the checkout root to the end, in place, keeping their order."""
    root = checkout_root()
    if root is None:
        return
    at_root = [entry for entry in sys.path if _is(entry, root)]
    if at_root:
        sys.path[:] = [entry for entry in sys.path if not _is(entry, root)] + at_root
