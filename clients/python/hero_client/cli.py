"""The ``hero-rewards`` command: ``serve`` runs the service (needs the [server] extra); ``score``
scores a JSONL file of prompt groups against a running service (client only); ``--version``."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Optional

# The package is installed from a clone (it is not on PyPI): the [server] extra of that path.
SERVER_INSTALL = "pip install '/path/to/hero-rewards[server]' (a clone of the repository)"

USAGE = f"""usage: hero-rewards COMMAND [options]
       hero-rewards --version

commands:
  serve     run the HTTP service (needs the server extra: {SERVER_INSTALL})
  score     score a JSONL file of prompt groups with a running service (resumable)

Run 'hero-rewards COMMAND --help' for a command's options."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from . import __version__  # the installed distribution's (pip's) version

        print(f"hero-rewards {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command == "serve":
        try:
            from hero_service.cli import main as serve_main
        except ImportError as exc:
            print(f"hero-rewards serve needs the server extra: {SERVER_INSTALL} ({exc})",
                  file=sys.stderr)
            return 2
        return serve_main(rest)
    if command == "score":
        from ._score_command import main as score_main

        return score_main(rest)
    print(f"hero-rewards: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
