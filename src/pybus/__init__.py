"""Deprecated alias of ``iambus``: ``import pybus`` still works, with a FutureWarning."""

import sys
import warnings

import iambus
from iambus import *  # noqa: F403
from iambus import __all__, dispatcher  # noqa: F401

warnings.warn(
    "the 'pybus' package name is deprecated; import 'iambus' instead",
    FutureWarning,
    stacklevel=2,
)

# `import pybus.<module>` gets the very module of iambus, not a second copy of it.
for _name, _module in list(sys.modules.items()):
    if _name.startswith("iambus."):
        _alias = _name.removeprefix("iambus.")
        sys.modules["pybus." + _alias] = _module
        if "." not in _alias and _alias not in globals():
            globals()[_alias] = _module
del _name, _module, _alias, iambus
