"""Credentials, the API-root option and the client plumbing, against the Drive v2 emulator."""

from __future__ import annotations

import json
import logging
import sys
import traceback
import types

import google.auth.credentials
import pytest

from nbguard.errors import StoreError, UsageError
from nbguard.stores.drive import (
    API_ROOT_ENV,
    CREDENTIALS_ENV,
    DriveClient,
    DriveStore,
    RetryPolicy,
    load_credentials,
)
from nbguard.stores.drive.client import discovery_document, resolve_api_root
from nbguard.stores.drive.retry import DriveHTTPError, is_transient
from nbguard.stores.drive.store import parse_drive_url
from nbguard.stores.drive.transfer import blocks
from tests.drive_emulator import DriveEmulator

FAST = RetryPolicy(attempts=4, base_delay=0.001, max_delay=0.005)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in (CREDENTIALS_ENV, API_ROOT_ENV, "KAGGLE_KERNEL_RUN_TYPE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.delitem(sys.modules, "kaggle_secrets", raising=False)


@pytest.fixture
def emulator():
    with DriveEmulator() as emu:
        yield emu
        assert not emu.errors, emu.errors[0]


def round_trip(emulator, **options) -> DriveStore:
    store = DriveStore("gdrive://nbguard/c", retry=FAST, **options)
    store.write("hello.txt", [b"hi"])
    assert store.read("hello.txt") == b"hi"
    return store


# -- API root --------------------------------------------------------------------------------------------------
def test_api_root_resolution(monkeypatch):
    assert resolve_api_root() == "https://www.googleapis.com/"
    monkeypatch.setenv(API_ROOT_ENV, "http://127.0.0.1:9999")
    assert resolve_api_root() == "http://127.0.0.1:9999/"
    assert resolve_api_root("https://drive.example.test/api/") == "https://drive.example.test/api/"
    with pytest.raises(UsageError, match="unencrypted"):
        resolve_api_root("http://drive.example.test/")
    with pytest.raises(UsageError, match="http"):
        resolve_api_root("ftp://x/")


def test_discovery_document_points_every_url_at_the_root():
    doc = discovery_document("http://127.0.0.1:1234/")
    assert doc["rootUrl"] == "http://127.0.0.1:1234/" and doc["baseUrl"] == "http://127.0.0.1:1234/drive/v2/"
    assert doc["batchPath"] == "batch/drive/v2" and doc["version"] == "v2"
    assert "https://www.googleapis.com/drive" not in json.dumps({k: v for k, v in doc.items() if k != "auth"})


def test_api_root_from_the_environment(emulator, monkeypatch):
    monkeypatch.setenv(API_ROOT_ENV, emulator.url)
    round_trip(emulator, credentials=emulator.authorized_user_info())
    assert all(r.path != "" for r in emulator.requests) and len(emulator.requests) > 3


# -- credentials ---------------------------------------------------------------------------------------------------
def test_credentials_env_var_with_a_file_path(emulator, monkeypatch, tmp_path):
    path = tmp_path / "creds.json"
    path.write_text(json.dumps(emulator.authorized_user_info()))
    monkeypatch.setenv(CREDENTIALS_ENV, str(path))
    round_trip(emulator, api_root=emulator.url)
    assert emulator.token_requests == 1


def test_credentials_env_var_with_json_text(emulator, monkeypatch):
    monkeypatch.setenv(CREDENTIALS_ENV, "  " + json.dumps(emulator.authorized_user_info()))
    round_trip(emulator, api_root=emulator.url)


def test_credentials_argument_forms(emulator, tmp_path):
    info = emulator.authorized_user_info()
    (tmp_path / "c.json").write_text(json.dumps(info))
    for form in (info, json.dumps(info), str(tmp_path / "c.json"), tmp_path / "c.json", load_credentials(info)):
        assert isinstance(load_credentials(form), google.auth.credentials.Credentials)
    round_trip(emulator, credentials=load_credentials(info), api_root=emulator.url)


def test_token_refresh_against_the_token_endpoint(emulator):
    store = round_trip(emulator, credentials=emulator.authorized_user_info(), api_root=emulator.url)
    assert emulator.token_requests == 1
    emulator.expire_tokens()
    assert store.read("hello.txt") == b"hi"
    assert emulator.token_requests == 2
    assert [r.status for r in emulator.requests if r.path == "/token"] == [200, 200]


def test_explicit_argument_wins_over_the_environment(emulator, monkeypatch):
    monkeypatch.setenv(CREDENTIALS_ENV, "{not json")
    round_trip(emulator, credentials=emulator.authorized_user_info(), api_root=emulator.url)


@pytest.mark.parametrize("value,message", [
    ("", "no Google Drive credentials"),
    ("/no/such/file.json", "neither JSON text nor the path"),
    ("{broken", "not valid JSON"),
    ('{"installed": {"client_id": "x"}}', "OAuth client file"),
    ('{"type": "authorized_user", "client_id": "x"}', "lacks client_secret, refresh_token"),
    ('{"type": "external_account"}', "neither authorized-user nor service-account"),
    ('["a"]', "not a JSON object"),
])
def test_bad_credentials_say_what_to_do(monkeypatch, value, message):
    monkeypatch.setenv(CREDENTIALS_ENV, value)
    with pytest.raises(StoreError, match=message) as info:
        load_credentials()
    assert CREDENTIALS_ENV in str(info.value) or "service" in str(info.value)


def test_http_token_uri_off_this_machine_is_refused(emulator):
    info = {**emulator.authorized_user_info(), "token_uri": "http://login.example.test/token"}
    with pytest.raises(UsageError, match="unencrypted"):
        load_credentials(info)


def test_secrets_never_show(emulator, caplog, capsys, tmp_path):
    planted_refresh = "1//PLANTED-REFRESH-" + "r" * 20
    planted_access = "ya29.PLANTED-ACCESS-" + "a" * 20
    info = {**emulator.authorized_user_info(), "refresh_token": planted_refresh, "token": planted_access}
    caplog.set_level(logging.DEBUG)
    store = DriveStore("gdrive://nbguard/s", credentials=info, api_root=emulator.url, retry=FAST,
                       cache_dir=tmp_path)
    with pytest.raises(StoreError) as info_exc:
        store.list("")  # the planted access token is refused, and so is the refresh token
    emulator.inject("quota", match="POST /upload/")
    good = DriveStore("gdrive://nbguard/s", credentials={**emulator.authorized_user_info(), "token": planted_access},
                      api_root=emulator.url, retry=FAST)
    with pytest.raises(StoreError) as quota_exc:
        good.write("x", [b"1"])
    texts = [
        str(info_exc.value), repr(info_exc.value), str(quota_exc.value),
        "".join(traceback.format_exception(info_exc.value)), "".join(traceback.format_exception(quota_exc.value)),
        repr(store), repr(store.client), repr(store.client.auth.credentials), caplog.text,
        *capsys.readouterr(), repr(emulator.requests),
    ]
    secrets = (planted_refresh, planted_access, emulator.refresh_token, emulator.client_secret)
    for text in texts:
        for secret in secrets:
            assert secret not in text
    assert "NBGUARD_DRIVE_CREDENTIALS" in str(info_exc.value)


def service_account_info(emulator) -> dict:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return {"type": "service_account", "client_email": "nb@project.iam.gserviceaccount.com", "private_key": pem,
            "private_key_id": "k1", "token_uri": emulator.token_uri, "project_id": "project"}


def test_service_account_warns_about_quota(emulator):
    info = service_account_info(emulator)
    with pytest.warns(UserWarning, match="no Drive storage quota of their own.*shared drive"):
        creds = load_credentials(info)
    round_trip(emulator, credentials=creds, api_root=emulator.url)
    broken = {**info, "private_key": "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n"}
    with pytest.raises(StoreError, match="private key .* cannot be read"):
        load_credentials(broken)


def fake_colab(monkeypatch, secret=None, default_creds=None):
    calls = []
    colab = types.ModuleType("google.colab")

    def get(name):
        calls.append(("userdata", name))
        if secret is None:
            raise RuntimeError("SecretNotFoundError")
        return secret

    colab.userdata = types.SimpleNamespace(get=get)
    colab.auth = types.SimpleNamespace(authenticate_user=lambda: calls.append(("authenticate_user",)))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    if default_creds is not None:
        monkeypatch.setattr(google.auth, "default", lambda scopes=None: (calls.append(("default", scopes))
                                                                          or default_creds, "project"))
    return calls


def test_kaggle_secret_comes_first(emulator, monkeypatch):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    colab_calls = fake_colab(monkeypatch, secret="{}")
    kaggle = types.ModuleType("kaggle_secrets")
    asked = []

    class UserSecretsClient:
        def get_secret(self, name):
            asked.append(name)
            return json.dumps(emulator.authorized_user_info())

    kaggle.UserSecretsClient = UserSecretsClient
    monkeypatch.setitem(sys.modules, "kaggle_secrets", kaggle)
    round_trip(emulator, api_root=emulator.url)
    assert asked == [CREDENTIALS_ENV] and colab_calls == []


def test_kaggle_without_the_secret(monkeypatch):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    kaggle = types.ModuleType("kaggle_secrets")

    class UserSecretsClient:
        def get_secret(self, name):
            raise KeyError(name)

    kaggle.UserSecretsClient = UserSecretsClient
    monkeypatch.setitem(sys.modules, "kaggle_secrets", kaggle)
    with pytest.raises(StoreError, match="Kaggle secret NBGUARD_DRIVE_CREDENTIALS is missing.*Internet"):
        load_credentials()


def test_colab_secret(emulator, monkeypatch):
    calls = fake_colab(monkeypatch, secret=json.dumps(emulator.authorized_user_info()))
    round_trip(emulator, api_root=emulator.url)
    assert calls == [("userdata", CREDENTIALS_ENV)]


def test_colab_falls_back_to_the_users_login(emulator, monkeypatch):
    creds = load_credentials(emulator.authorized_user_info())
    calls = fake_colab(monkeypatch, default_creds=creds)
    round_trip(emulator, api_root=emulator.url)
    assert calls == [("userdata", CREDENTIALS_ENV), ("authenticate_user",),
                     ("default", ["https://www.googleapis.com/auth/drive"])]


# -- plumbing ---------------------------------------------------------------------------------------------------
def test_client_metadata_calls(emulator):
    client = DriveClient(emulator.authorized_user_info(), api_root=emulator.url, retry=FAST)
    folder = client.create_folder("it's", "root")
    assert [f["title"] for f in client.children("root", title="it's", folders=True)] == ["it's"]
    assert client.get(folder["id"])["title"] == "it's" and client.get("1" + "x" * 30) is None
    client.delete(folder["id"])
    client.delete(folder["id"])  # already gone: fine
    assert client.children("root") == [] and int(client.about()["quotaBytesTotal"]) == emulator.quota_bytes
    assert repr(client) == f"DriveClient(api_root={emulator.url!r})"


def test_transient_classification():
    assert is_transient(DriveHTTPError(503)) and is_transient(DriveHTTPError(429))
    assert is_transient(DriveHTTPError(403, "userRateLimitExceeded")) and is_transient(ConnectionResetError())
    assert not is_transient(DriveHTTPError(403, "storageQuotaExceeded")) and not is_transient(DriveHTTPError(404))
    assert not is_transient(DriveHTTPError(401, "authError"))


def test_backoff_grows_with_jitter_and_respects_retry_after():
    policy = RetryPolicy(attempts=9, base_delay=1.0, max_delay=8.0)
    for failures, cap in [(1, 1), (2, 2), (3, 4), (4, 8), (9, 8)]:
        delays = {policy.backoff(failures) for _ in range(20)}
        assert all(cap / 2 <= d <= cap for d in delays) and len(delays) > 1
    assert policy.backoff(1, retry_after=5) >= 5 and policy.backoff(1, retry_after=100) <= 8


def test_blocks_cut_exact_chunks_and_mark_the_last():
    def cut(chunks, size=4):
        return [(bytes(b.data), b.start, b.last) for b in blocks(chunks, size)]

    assert cut([]) == [(b"", 0, True)]
    assert cut([b"abcd"]) == [(b"abcd", 0, True)]
    assert cut([b"ab", b"cd", b"", b"e"]) == [(b"abcd", 0, False), (b"e", 4, True)]
    assert cut([b"abcdefghij"]) == [(b"abcd", 0, False), (b"efgh", 4, False), (b"ij", 8, True)]
    assert cut([b"abcd", b""]) == [(b"abcd", 0, True)]
    assert cut([memoryview(b"abcdefgh").cast("B", shape=[2, 4])]) == [(b"abcd", 0, False), (b"efgh", 4, True)]


def test_drive_urls():
    assert parse_drive_url("gdrive://nbguard/mynotebook") == ("root", ("nbguard", "mynotebook"))
    assert parse_drive_url("gdrive://root/a/b/") == ("root", ("a", "b"))
    assert parse_drive_url("drive://1AbCdEfGhIjKlMnOpQrStUvWxYz0123/x") == ("1AbCdEfGhIjKlMnOpQrStUvWxYz0123", ("x",))
    assert parse_drive_url("gdrive://") == ("root", ())
    for bad in ("s3://x", "gdrive://a/../b", "nbguard"):
        with pytest.raises(UsageError):
            parse_drive_url(bad)
    with pytest.raises(UsageError, match="256 KiB"):
        DriveStore("gdrive://x", credentials={"refresh_token": "r", "client_id": "i", "client_secret": "s"},
                   chunk_size=1000)
