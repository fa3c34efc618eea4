"""``hero-rewards serve``: every Settings field is a flag (``--max-batch-tokens``) and an
environment variable (``HERO_MAX_BATCH_TOKENS``); flags win.

Start-up is checked before uvicorn starts: the settings, the API key (file), the device and the
reward model (loaded here, not in the app's lifespan). A failure prints one line,
``hero-rewards serve: error: <cause>``, and exits with status 2 — no traceback (``--log-level
debug`` logs it). Whatever still fails inside the lifespan (the verifier pool) ends the same way.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

from pydantic import ValidationError

from .config import Settings
from .redaction import RedactingFilter, redact_text

if TYPE_CHECKING:
    from fastapi import FastAPI

PROG = "hero-rewards serve"
EXIT_STARTUP_FAILURE = 2
# uvicorn's own exit status when its start-up fails (a lifespan error, a port in use).
_UVICORN_STARTUP_FAILURE = 3
_MAX_CAUSE_CHARS = 600
log = logging.getLogger("hero_service")


class StartupError(Exception):
    """A start-up problem, in words an operator can act on."""


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


def _is_secret_setting(name: str) -> bool:
    field = Settings.model_fields.get(name)
    return field is None or "SecretStr" in str(field.annotation)


def describe_settings_error(exc: ValidationError) -> str:
    """``--port (HERO_PORT): Input should be ... (got '70000')``, every problem on one line."""
    problems = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error.get("loc") else ""
        where = f"--{name.replace('_', '-')} (HERO_{name.upper()})" if name else "settings"
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        value = error.get("input")
        if name and not _is_secret_setting(name) and isinstance(value, (str, int, float)):
            message += f" (got {redact_text(repr(value))[:80]})"
        problems.append(f"{where}: {message}")
    return "; ".join(problems)


def check_device(settings: Settings) -> None:
    """``--device cuda`` on a machine without CUDA (or ``cuda:3`` on a 2-GPU one) is an operator
    error; say so instead of failing inside the model loader."""
    if settings.reward_model.startswith("remote:") or settings.device == "auto":
        return  # a remote RM runs elsewhere; auto picks what exists
    import torch

    try:
        device = torch.device(settings.device)
    except (RuntimeError, ValueError) as exc:
        raise StartupError(f"--device {settings.device!r} is not a device: {exc} "
                           "(use auto, cpu, cuda or cuda:N)") from None
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise StartupError(f"--device {settings.device}: CUDA is not available on this machine "
                           "(torch.cuda.is_available() is False); use --device cpu or auto")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise StartupError(f"--device {settings.device}: this machine has {count} CUDA "
                           f"device(s) (cuda:0..cuda:{count - 1})")


def one_line(exc: BaseException) -> str:
    """An exception as one redacted line (loaders like to raise multi-line messages)."""
    text = redact_text(f"{type(exc).__name__}: {' '.join(str(exc).split()) or '(no message)'}")
    return text if len(text) <= _MAX_CAUSE_CHARS else text[:_MAX_CAUSE_CHARS] + " ..."


def fail(cause: str) -> int:
    print(f"{PROG}: error: {cause}", file=sys.stderr, flush=True)
    return EXIT_STARTUP_FAILURE


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
    # The model loaders' progress bars and length warnings are noise in a service log.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's own logging, with the same redaction on its handlers (its error log prints
    exception messages, which may quote a URL)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact"] = {"()": RedactingFilter}
    for handler in config["handlers"].values():
        handler["filters"] = [*handler.get("filters", []), "redact"]
    return config


def serve(settings: Settings) -> int:
    """Run the service until it is stopped; the exit status (0, or 2 for a start-up failure)."""
    from .app import create_app, default_reward_model
    from .group_store.factory import check_group_store_settings

    configure_logging(settings.log_level)
    log.info("settings: %s", json.dumps(settings.describe(), sort_keys=True))
    try:
        check_device(settings)
    except StartupError as exc:
        return fail(str(exc))
    try:
        check_group_store_settings(settings)
    except ValueError as exc:
        return fail(str(exc))
    try:
        model = default_reward_model(settings)
    except Exception as exc:  # any loader failure is a start-up failure, reported in one line
        log.debug("reward model failed to load", exc_info=True)
        shown = redact_text(settings.reward_model)
        return fail(f"cannot load the reward model {shown!r}: {one_line(exc)}")
    return run_server(create_app(settings, reward_model_factory=lambda _: model), settings)


def run_server(app: FastAPI, settings: Settings) -> int:
    """uvicorn until stopped: 0, or 2 with one ``error:`` line when its start-up failed (the
    lifespan, which then closed what it had opened, or the bind)."""
    import uvicorn

    from .server import DrainingServer

    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=settings.log_level.lower(), access_log=False,
                            log_config=uvicorn_log_config(), timeout_graceful_shutdown=30,
                            timeout_keep_alive=settings.keep_alive_s)
    server = DrainingServer(config, app, settings.drain_timeout_s)
    try:
        server.run()
    except SystemExit as exc:
        if exc.code != _UVICORN_STARTUP_FAILURE:
            raise
    if not server.started:
        return fail(app.state.service.startup_error
                    or "the server did not start (see the log above)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Run the hero-rewards HTTP service.")
    add_settings_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        return fail(describe_settings_error(exc))
    try:
        settings.resolved_api_key()
    except (OSError, UnicodeDecodeError) as exc:
        return fail(f"cannot read the API key file {settings.api_key_file}: "
                    f"{exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}")
    except ValueError as exc:
        return fail(str(exc))
    try:
        settings.check_bind_safety()
    except ValueError as exc:
        return fail(str(exc))
    return serve(settings)
