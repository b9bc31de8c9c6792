"""The coordinator's security options: Redis user and TLS, update signing, the API token.

`add_options` adds them to the command line; `settings_fields` turns them into
the (non-secret) fields of `CoordinatorSettings`, saved with the run; and
`load_secrets` reads the secrets themselves, once, at the entry point, from
files or the environment (see `bus.credentials`), into `CoordinatorSecrets`,
which is never saved or logged.
"""

from __future__ import annotations

import argparse
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bus.credentials import (
    API_TOKEN_ENV,
    API_TOKEN_FILE_ENV,
    CLIENT_KEYS_ENV,
    REDIS_PASSWORD_ENV,
    REDIS_PASSWORD_FILE_ENV,
    Keyring,
    add_redis_options,
    read_secret,
    redis_option_values,
    secret_from,
    write_secret,
)
from bus.errors import CredentialsError
from coordinator.settings import CoordinatorSecrets, CoordinatorSettings
from serialization import AnyJob
from serialization.signing import signed_job

API_TOKEN_FILE = "api_token"  # noqa: S105 - a file name, not a token

GROUP_DESCRIPTION = f"""\
Secrets are read from files or the environment, never from the command line.
Redis password: --redis-password-file, ${REDIS_PASSWORD_FILE_ENV} or ${REDIS_PASSWORD_ENV}.
Update signing is OFF unless --client-keys (or ${CLIENT_KEYS_ENV}) or --sign-updates
is given: without it any agent that can reach Redis may answer any client's job,
which is fine for the single-machine default. The API token guards POST routes (/stop)
and model download (/slots/ID/model, /runs/RUN/checkpoints); without one configured, a
random token is written to RUN_DIR/{API_TOKEN_FILE}."""


def add_options(g: argparse._ArgumentGroup) -> None:
    add_redis_options(g)
    g.add_argument("--client-keys", metavar="DIR",
                   help="per-client HMAC keys, one file DIR/CLIENT_ID.key each: every update "
                        "must carry its client's signature (bad or missing: rejected as "
                        "bad_signature)")
    g.add_argument("--sign-updates", action="store_true",
                   help="sign updates even without --client-keys: --local-agents get keys "
                        "generated for this run, passed as 0600 files")
    g.add_argument("--api-token-file", type=Path, metavar="FILE",
                   help=f"bearer token for POST routes and model download "
                        f"(else ${API_TOKEN_FILE_ENV} or ${API_TOKEN_ENV})")


def settings_fields(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, Any]:
    """The non-secret settings these options give (None where not given, for --resume)."""
    keys_dir = args.client_keys or environ.get(CLIENT_KEYS_ENV) or None
    return {**redis_option_values(args, environ), "client_keys_dir": keys_dir,
            "sign_updates": True if args.sign_updates or keys_dir else None}


def load_secrets(args: argparse.Namespace, settings: CoordinatorSettings,
                 environ: Mapping[str, str]) -> CoordinatorSecrets:
    """Read the run's secrets; SystemExit with the reason when one cannot be used."""
    try:
        password = secret_from(args.redis_password_file, environ, REDIS_PASSWORD_ENV,
                               REDIS_PASSWORD_FILE_ENV)
        token = secret_from(args.api_token_file, environ, API_TOKEN_ENV, API_TOKEN_FILE_ENV)
        token_file = None if token else _new_api_token(settings.run_dir)
        if token_file is not None:
            token = read_secret(token_file)
        return CoordinatorSecrets(redis_password=password, api_token=token,
                                  api_token_file=None if token_file is None else str(token_file),
                                  keyring=_keyring(settings))
    except CredentialsError as exc:
        raise SystemExit(f"error: {exc}") from None


def job_bytes(job: AnyJob, keyring: Keyring | None) -> bytes:
    """The job as published: signed with its client's key when signing is on (agents with
    keys run only signed jobs), unsigned for a client without a key or with signing off."""
    key = None if keyring is None else keyring.get(job.client_id)
    return (job if key is None else signed_job(job, key)).to_bytes()


def _keyring(settings: CoordinatorSettings) -> Keyring | None:
    """Clients' keys: from the key directory, plus fresh ones for local agents' clients."""
    if not settings.sign_updates:
        return None
    keyring = Keyring()
    if settings.client_keys_dir:
        keyring = Keyring.from_dir(Path(settings.client_keys_dir))
    if settings.local_agents > 0:
        keyring = keyring.with_generated(str(i) for i in range(settings.expected_clients))
    return keyring


def _new_api_token(run_dir: Path) -> Path:
    """A random token for this run, written to RUN_DIR/api_token (0600) for the operator."""
    path = run_dir / API_TOKEN_FILE
    run_dir.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # a resumed run gets a new one
    write_secret(path, secrets.token_urlsafe(32))
    return path
