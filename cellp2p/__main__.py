"""``python -m cellp2p``."""

from cellp2p.cli import main

main()
