"""``python -m tpatcher.server --store DIR ...``: the same as ``tpatcher serve``."""

from .command import main

main()
