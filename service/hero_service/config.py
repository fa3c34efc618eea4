"""Service configuration: one settings object, from CLI flags and ``HERO_*`` environment variables
(flags win). Printed at start-up with secrets masked."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from hero_client.schema import VerifierName

from .redaction import redact_text

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HERO_", extra="ignore")

    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="bind port")
    reward_model: str = Field(
        "embedded", description="embedded | hf:PATH | remote:URL (the reward model backend)"
    )
    verifier: VerifierName = Field(
        "math", description="default verifier for requests that name none")
    api_key: Optional[SecretStr] = Field(
        None, description="bearer key required on scoring endpoints")
    api_key_file: Optional[Path] = Field(
        None, description="file holding the API key (Kubernetes Secret)")
    insecure: bool = Field(False, description="allow a non-loopback bind without an API key")

    # Reward model.
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bf16 on GPU, fp32 on CPU"
    )
    max_length: int = Field(0, ge=0, description="RM token limit per rollout; 0 = the model's own")
    trust_remote_code: bool = Field(False, description="let a hf model directory run its own code")
    share_prompts: bool = Field(
        True, description="hf causal RMs: encode a group's prompt once for all its responses "
        "(where exact; off for encoders)")
    remote_timeout_s: float = Field(30.0, gt=0, description="timeout of one remote RM call")

    # Dynamic batching.
    max_batch_tokens: int = Field(
        0, ge=0,
        description="padded tokens per forward batch; 0 = 4096 on CPU, 16384 on GPU/remote")
    max_wait_ms: float = Field(5.0, ge=0, description="how long a batch waits to fill")
    max_queued_rollouts: int = Field(
        4096, ge=1, description="rollouts held at once (scored or parked); beyond it: 429")

    # Verifier pool.
    verifier_workers: int = Field(0, ge=0, description="worker processes; 0 = one per core")
    verifier_timeout_s: int = Field(
        5, ge=1, description="math-verify timeout per parse/compare (s); a worker whose call runs "
        "1 s past it is killed (per call, not per chunk)")
    verifier_max_tasks: int = Field(
        2000, ge=1, description="recycle a worker after this many tasks")
    verifier_memory_mb: int = Field(
        2048, ge=0, description="address-space cap per worker; 0 = none")
    # Responses decoded with skip_special_tokens=False end with the policy's EOS/pad text.
    strip_special_tokens: bool = Field(
        True, description="remove trailing EOS/pad text (<|im_end|>, </s>, <|eot_id|>, ...) from "
        "responses before the verifier, and from /get_reward responses before the RM")
    extra_special_tokens: str = Field(
        "", description="comma-separated texts stripped too, besides the built-in list")

    # Group assembly across requests (OpenRLHF per-query traffic); 0 = off.
    group_size: int = Field(0, ge=0, description="assemble groups of this size across requests")
    group_timeout_s: float = Field(30.0, gt=0, description="score a partial group after this wait")
    # Where assembling groups meet: this process, or a Redis shared by every replica.
    group_store: str = Field(
        "memory", description="memory | redis://host:port/db | rediss://host:port/db (TLS): "
        "where groups assembled across requests and the server's running sigma live")
    group_store_password: Optional[SecretStr] = Field(
        None, description="Redis password for --group-store (never logged)")
    group_store_password_file: Optional[Path] = Field(
        None, description="file holding the Redis password (Kubernetes Secret)")

    # Input limits.
    max_body_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="largest request body; beyond it: 413")
    max_groups: int = Field(1024, ge=1, description="groups per request")
    max_responses_per_group: int = Field(256, ge=1, description="responses per group")
    max_response_chars: int = Field(200_000, ge=1, description="characters per response")

    # Reward diagnostics: responses the verifier and the RM disagree about (audit.py).
    audit_log: Optional[Path] = Field(
        None, description="append one JSON line per flagged response (verifier/RM "
        "disagreement) to this file; unset: off")
    audit_sample_rate: float = Field(
        1.0, ge=0.0, le=1.0, description="share of flagged responses written to --audit-log")
    audit_max_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="rotate --audit-log at this size (3 older files "
        "kept)")

    drain_timeout_s: float = Field(
        120.0, ge=0, description="on SIGTERM, how long in-flight requests may take to finish")
    keep_alive_s: int = Field(
        75, ge=1, description="how long an idle client connection is kept open; longer than "
        "the clients' and any proxy's idle timeout (5 s for the SDK and httpx, 15 s aiohttp, "
        "60 s typical load balancers), so none reuses a connection the service is closing")

    log_level: str = Field("info", description="debug | info | warning | error")

    @field_validator("reward_model")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        if v != "embedded" and not v.startswith(("hf:", "remote:")):
            raise ValueError("reward_model must be 'embedded', 'hf:PATH' or 'remote:URL'")
        return v

    def resolved_api_key(self) -> Optional[str]:
        if self.api_key is not None and self.api_key.get_secret_value():
            return self.api_key.get_secret_value()
        if self.api_key_file is not None:
            key = self.api_key_file.read_text().strip()
            if not key:
                raise ValueError(f"API key file {self.api_key_file} is empty")
            return key
        return None

    def resolved_max_batch_tokens(self, device_type: str) -> int:
        # On CPU, per-rollout cost is lowest at small batches (bench/README.md); a GPU wants
        # large ones.
        return self.max_batch_tokens or (4096 if device_type == "cpu" else 16384)

    def resolved_verifier_workers(self) -> int:
        return self.verifier_workers or max(1, len(os.sched_getaffinity(0)))

    def check_bind_safety(self) -> None:
        """Refuse to expose an unauthenticated scorer beyond this machine."""
        if self.insecure or self.resolved_api_key() is not None or is_loopback(self.host):
            return
        raise ValueError(
            f"refusing to bind {self.host} without an API key: set --api-key/HERO_API_KEY "
            "(or --api-key-file), or pass --insecure to accept unauthenticated access"
        )

    def describe(self) -> dict[str, object]:
        # Every string through the one redaction rule: URLs (remote RM, group store) may carry
        # user:password or ?api_key=... (SecretStr fields already dump as '**********').
        shown = {name: redact_text(value) if isinstance(value, str) else value
                 for name, value in self.model_dump(mode="json").items()}
        shown["api_key"] = "***" if self.resolved_api_key() else None
        return shown


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
