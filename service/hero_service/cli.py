"""``hero-rewards serve``: every Settings field is a flag (``--max-batch-tokens``) and an
environment variable (``HERO_MAX_BATCH_TOKENS``); flags win."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional, Sequence

from .config import Settings


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = "HERO_" + name.upper()
        help_text = f"{field.description or ''} [env {env}; default {field.default!r}]"
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=name.upper(),
                                help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {name: getattr(args, name) for name in Settings.model_fields
             if getattr(args, name, None) is not None}
    return Settings(**given)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The model loaders' progress bars and length warnings are noise in a service log.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def serve(settings: Settings) -> None:
    import uvicorn

    from .app import create_app
    from .server import DrainingServer

    configure_logging(settings.log_level)
    settings.check_bind_safety()
    logging.getLogger("hero_service").info(
        "settings: %s", json.dumps(settings.describe(), sort_keys=True))
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=settings.log_level.lower(), access_log=False,
                            timeout_graceful_shutdown=30)
    DrainingServer(config, app, settings.drain_timeout_s).run()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="hero-rewards serve",
                                     description="Run the hero-rewards HTTP service.")
    add_settings_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
        settings.check_bind_safety()
    except ValueError as exc:
        print(f"hero-rewards serve: error: {exc}", file=sys.stderr)
        return 2
    serve(settings)
    return 0
