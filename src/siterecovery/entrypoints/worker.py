"""``python -m siterecovery.entrypoints.worker --vault DIR``: the vault's background worker."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from siterecovery.control import handlers  # noqa: F401  (registers job handlers)
from siterecovery.control.vault import open_vault
from siterecovery.control.worker import Worker
from siterecovery.errors import SiteRecoveryError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="siterecovery-worker")
    parser.add_argument("--vault", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        vault = open_vault(args.vault)
        worker = Worker(vault)
    except SiteRecoveryError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    signal.signal(signal.SIGTERM, lambda *_: worker.stop.set())
    signal.signal(signal.SIGINT, lambda *_: worker.stop.set())
    try:
        worker.run_forever()
    except SiteRecoveryError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
