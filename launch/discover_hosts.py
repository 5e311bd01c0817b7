#!/usr/bin/env python3
"""Host discovery script for elastic horovodrun: prints `host:slots` for the workers the job wants.

    horovodrun --min-np 1 --max-np 4 --network-interface lo \
      --host-discovery-script "launch/discover_hosts.py --run-dir RUN --max-np 4 [--hostfile F]" \
      hvd-abs train --elastic --out RUN ...

See hvd_abs/launch/discovery.py. Standard library only, so every poll is fast.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from hvd_abs.launch.discovery import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
