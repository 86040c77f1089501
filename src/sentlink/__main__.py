from __future__ import annotations

from sentlink.cli import main

main()
