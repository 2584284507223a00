"""``python -m lrcomp``: the ``lrcomp`` command line (:mod:`lrcomp.cli`)."""

from lrcomp.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
