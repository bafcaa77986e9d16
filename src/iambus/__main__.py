"""``python -m iambus ...``: the same as the ``iambus`` command (see ``iambus.cli``)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
