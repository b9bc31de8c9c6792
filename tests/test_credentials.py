"""Secrets from files and the environment; per-client keyrings on disk."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from bus.credentials import Keyring, read_secret, secret_from, write_secret
from bus.errors import CredentialsError

ENV, FILE_ENV = "PWFL_TEST_SECRET", "PWFL_TEST_SECRET_FILE"
KEY = "k" * 32


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_explicit_file_wins_over_the_environment(tmp_path: Path) -> None:
    """An explicit file beats *_FILE in the environment, which beats the value itself."""
    write_secret(tmp_path / "a", "from-option")
    write_secret(tmp_path / "b", "from-file-env")
    environ = {ENV: "from-env", FILE_ENV: str(tmp_path / "b")}
    assert secret_from(tmp_path / "a", environ, ENV, FILE_ENV) == "from-option"
    assert secret_from(None, environ, ENV, FILE_ENV) == "from-file-env"
    assert secret_from(None, {ENV: "from-env"}, ENV, FILE_ENV) == "from-env"
    assert secret_from(None, {ENV: ""}, ENV, FILE_ENV) is None


def test_written_secrets_are_private_and_never_replaced(tmp_path: Path) -> None:
    """write_secret creates a 0600 file and refuses to overwrite one."""
    path = tmp_path / "token"
    write_secret(path, "s3cret")
    assert mode(path) == 0o600
    assert read_secret(path) == "s3cret"
    with pytest.raises(FileExistsError):
        write_secret(path, "other")


def test_unusable_secret_files_are_errors(tmp_path: Path) -> None:
    """A missing or empty secret file raises CredentialsError naming the file."""
    with pytest.raises(CredentialsError, match="cannot read"):
        read_secret(tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(CredentialsError, match="empty"):
        read_secret(tmp_path / "empty")


def test_readable_by_others_is_used_with_a_warning(tmp_path: Path) -> None:
    """A secret file others may read still works, and a warning names it (not its content)."""
    path = tmp_path / "pw"
    path.write_text("hunter2-hunter2\n")
    path.chmod(0o644)
    with capture_logs() as logs:
        assert read_secret(path) == "hunter2-hunter2"
    assert [e["event"] for e in logs] == ["secret_file_permissive"]
    assert "hunter2" not in repr(logs)


def test_keyring_reads_each_required_client_key(tmp_path: Path) -> None:
    """from_dir with client ids loads CLIENT_ID.key for each and fails if one is missing."""
    Keyring({"0": KEY.encode(), "1": ("x" * 40).encode()}).write_dir(tmp_path)
    assert Keyring.from_dir(tmp_path, ["0"]).keys == {"0": KEY.encode()}
    assert set(Keyring.from_dir(tmp_path).keys) == {"0", "1"}
    with pytest.raises(CredentialsError, match=r"2\.key"):
        Keyring.from_dir(tmp_path, ["0", "2"])


def test_short_keys_and_odd_client_ids_are_refused(tmp_path: Path) -> None:
    """A key under 16 bytes, or a client id that cannot name a file, is a CredentialsError."""
    write_secret(tmp_path / "0.key", "short")
    with pytest.raises(CredentialsError, match="at least 16"):
        Keyring.from_dir(tmp_path, ["0"])
    for bad in ("../0", "a/b", ".hidden", ""):
        with pytest.raises(CredentialsError, match="cannot name a key file"):
            Keyring.from_dir(tmp_path, [bad])


def test_generated_keys_go_to_private_files(tmp_path: Path) -> None:
    """with_generated adds random keys; write_dir stores them 0600 in a 0700 directory."""
    keyring = Keyring({"0": KEY.encode()}).with_generated(["0", "1", "2"])
    assert keyring.get("0") == KEY.encode()
    assert len({keyring.get("1"), keyring.get("2")}) == 2
    folder = keyring.subset(["1"]).write_dir(tmp_path / "agent")
    assert mode(folder) == 0o700
    assert [p.name for p in folder.iterdir()] == ["1.key"]
    assert mode(folder / "1.key") == 0o600
    assert Keyring.from_dir(folder, ["1"]).get("1") == keyring.get("1")


def test_keyring_repr_shows_clients_not_keys() -> None:
    """A keyring in a log or traceback names its clients only."""
    text = repr(Keyring({"7": KEY.encode()}))
    assert text == "Keyring(clients=['7'])"
    assert KEY not in text
