"""The ``hero-rewards`` command: ``serve`` runs the service (needs the [server] extra); ``score``
scores a JSONL file of prompt groups against a running service (client only)."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

USAGE = """usage: hero-rewards COMMAND [options]

commands:
  serve     run the HTTP service (pip install 'hero-rewards[server]')
  score     score a JSONL file of prompt groups with a running service (resumable)

Run 'hero-rewards COMMAND --help' for a command's options."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "serve":
        try:
            from hero_service.cli import main as serve_main
        except ImportError as exc:
            print(f"hero-rewards serve needs the server extra: pip install 'hero-rewards[server]' "
                  f"({exc})", file=sys.stderr)
            return 2
        return serve_main(rest)
    if command == "score":
        from ._jsonl import main as score_main

        return score_main(rest)
    print(f"hero-rewards: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
