"""``ftd``: the per-host daemon's command line.

Precedence of settings: the config file, then the environment (``FTD_HOST``), then the
command line (``--host``). Exit codes: 0 clean stop, 2 bad configuration, 3 unusable QEMU,
1 any other failure (the reason is logged and printed).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from ftd import __version__
from ftd.cluster.direct import load_key
from ftd.config import load_config
from ftd.daemon.service import Daemon
from ftd.errors import ConfigError, FtError, QemuVersionError
from ftd.log import setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftd", description="Fault-tolerance daemon for QEMU VMs")
    p.add_argument("--config", "-c", type=Path, default=Path("/etc/ftd/ftd.yaml"))
    p.add_argument("--host", help="this host's name in the cluster (overrides file and FTD_HOST)")
    p.add_argument(
        "--witness", action="store_true", help="run as a quorum witness: no VMs, a vote only"
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--version", action="version", version=f"ftd {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, host=args.host)
        key_file = cfg.cluster.heartbeat_key_file
        key = None if key_file is None else load_key(Path(key_file))
    except ConfigError as err:
        print(f"ftd: invalid configuration {args.config}:", file=sys.stderr)
        for issue in err.issues:
            print(f"  {issue}", file=sys.stderr)
        return 2
    setup_logging(args.log_level or cfg.log.level, cfg.log.json)
    daemon = Daemon(cfg, config_path=args.config, witness=args.witness, heartbeat_key=key)
    try:
        return asyncio.run(daemon.run())
    except QemuVersionError as err:
        print(f"ftd: refusing to start: {err}", file=sys.stderr)
        return 3
    except FtError as err:
        print(f"ftd: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
