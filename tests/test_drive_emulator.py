"""The Drive v2 emulator speaks what pydrive2 and googleapiclient send."""

from __future__ import annotations

import hashlib
import http.client
import io
import json

import httplib2
import pytest
from googleapiclient.http import MediaIoBaseUpload
from pydrive2.drive import GoogleDrive
from pydrive2.files import ApiRequestError

from nbguard.stores.drive import DriveClient, RetryPolicy
from tests.drive_emulator import FOLDER_MIME, DriveEmulator


@pytest.fixture
def emulator():
    with DriveEmulator(page_size=7) as emu:
        yield emu
        assert not emu.errors, emu.errors[0]


@pytest.fixture
def drive(emulator, monkeypatch) -> GoogleDrive:
    client = DriveClient(emulator.authorized_user_info(), api_root=emulator.url, retry=RetryPolicy(1))
    return GoogleDrive(client.auth)


def raw(emulator, method, path, body=None, headers=None, token=None):
    headers = dict(headers or {})
    if token is not False:
        headers["Authorization"] = f"Bearer {token or emulator.issue_token()}"
    http = httplib2.Http()
    http.redirect_codes = http.redirect_codes - {308}
    return http.request(emulator.url + path.lstrip("/"), method, body=body, headers=headers)


def test_pydrive2_round_trip(drive, emulator):
    folder = drive.CreateFile({"title": "runs", "mimeType": FOLDER_MIME})
    folder.Upload()
    f = drive.CreateFile({"title": "a.txt", "parents": [{"id": folder["id"]}]})
    f.SetContentString("hello drive")
    f.Upload()  # googleapiclient's resumable upload
    assert f["fileSize"] == "11" and f["md5Checksum"] == hashlib.md5(b"hello drive").hexdigest()
    again = drive.CreateFile({"id": f["id"]})
    assert again.GetContentString() == "hello drive"
    listed = drive.ListFile({"q": f"'{folder['id']}' in parents and trashed=false"}).GetList()
    assert [x["title"] for x in listed] == ["a.txt"]
    assert emulator.content(f["id"]) == b"hello drive"


def test_rename_move_trash_untrash_delete(drive, emulator):
    a = drive.CreateFile({"title": "a", "mimeType": FOLDER_MIME})
    a.Upload()
    f = drive.CreateFile({"title": "x.bin"})
    f.SetContentString("12345")
    f.Upload()
    f["title"] = "y.bin"
    f["parents"] = [{"id": a["id"]}]
    f.Upload()  # PATCH
    assert drive.ListFile({"q": f"'{a['id']}' in parents"}).GetList()[0]["title"] == "y.bin"
    f.Trash()
    assert drive.ListFile({"q": f"'{a['id']}' in parents and trashed=false"}).GetList() == []
    assert drive.GetAbout()["quotaBytesUsedInTrash"] == "5"  # the trash still counts
    f.UnTrash()
    assert len(drive.ListFile({"q": f"'{a['id']}' in parents and trashed=false"}).GetList()) == 1
    f.Delete()
    assert [x["title"] for x in emulator.files()] == ["a"] and emulator.quota_used() == 0
    with pytest.raises(ApiRequestError) as info:
        drive.CreateFile({"id": f["id"]}).FetchMetadata()
    assert info.value.error["code"] == 404 and info.value.GetField("reason") == "notFound"


def test_trashing_a_folder_hides_its_children(drive, emulator):
    folder_id = emulator.add_folder("f")
    emulator.add_file("inside", b"x", parent=folder_id)
    drive.CreateFile({"id": folder_id}).Trash()
    assert drive.ListFile({"q": f"'{folder_id}' in parents and trashed=false"}).GetList() == []


def test_list_pages_and_queries(drive, emulator):
    parent = emulator.add_folder("p")
    for i in range(17):
        emulator.add_file(f"f{i:02d}", b"x", parent=parent)
    emulator.add_file("it's \\ odd", b"y", parent=parent)
    emulator.add_folder("sub", parent=parent)
    everything = drive.ListFile({"q": f"'{parent}' in parents and trashed=false"}).GetList()
    assert len(everything) == 19
    assert [r.query.get("pageToken") for r in emulator.requests if r.path == "/drive/v2/files"] == [None, "7", "14"]
    odd = drive.ListFile({"q": f"'{parent}' in parents and title = 'it\\'s \\\\ odd'"}).GetList()
    assert [f["title"] for f in odd] == ["it's \\ odd"]
    folders = drive.ListFile({"q": f"'{parent}' in parents and mimeType = '{FOLDER_MIME}'"}).GetList()
    assert [f["title"] for f in folders] == ["sub"]
    files = drive.ListFile({"q": f"'{parent}' in parents and mimeType != '{FOLDER_MIME}' and title contains 'f1'"})
    assert len(files.GetList()) == 7
    assert drive.ListFile({"q": "'root' in parents"}).GetList()[0]["title"] == "p"


def test_multipart_and_media_uploads(drive, emulator):
    drive.auth.Authorize()
    service = drive.auth.service
    media = MediaIoBaseUpload(io.BytesIO(b"\x00\xffbinary\r\n--x"), mimetype="application/octet-stream", resumable=False)
    meta = service.files().insert(body={"title": "m.bin"}, media_body=media).execute(http=drive.auth.Get_Http_Object())
    assert emulator.content(meta["id"]) == b"\x00\xffbinary\r\n--x"
    assert any(r.query.get("uploadType") == "multipart" for r in emulator.requests)
    resp, content = raw(emulator, "POST", "upload/drive/v2/files?uploadType=media", body=b"raw bytes")
    assert resp.status == 200 and emulator.content(json.loads(content)["id"]) == b"raw bytes"


def test_resumable_protocol_by_hand(emulator):
    token = emulator.issue_token()
    resp, _ = raw(emulator, "POST", "upload/drive/v2/files?uploadType=resumable",
                  body=json.dumps({"title": "r.bin"}), headers={"Content-Type": "application/json"}, token=token)
    assert resp.status == 200
    session = resp["location"].replace(emulator.url, "")
    first = b"a" * (256 * 1024)
    resp, _ = raw(emulator, "PUT", session, body=first, headers={"Content-Range": f"bytes 0-{len(first) - 1}/*"}, token=token)
    assert resp.status == 308 and resp["range"] == f"bytes=0-{len(first) - 1}"
    assert emulator.files() == [] and emulator.open_uploads() == 1  # unfinished uploads are invisible
    resp, _ = raw(emulator, "PUT", session, body=b"tail", headers={"Content-Range": "bytes 100-199/*"}, token=token)
    assert resp.status == 400  # not a multiple of 256 KiB
    resp, _ = raw(emulator, "PUT", session, body=b"", headers={"Content-Range": "bytes */*"}, token=token)
    assert resp.status == 308 and resp["range"] == f"bytes=0-{len(first) - 1}"
    n = len(first)
    resp, content = raw(emulator, "PUT", session, body=b"tail", headers={"Content-Range": f"bytes {n}-{n + 3}/{n + 4}"},
                        token=token)
    assert resp.status == 200 and json.loads(content)["fileSize"] == str(n + 4)
    assert emulator.open_uploads() == 0 and len(emulator.files()) == 1


def test_ranges_and_errors(emulator):
    fid = emulator.add_file("d.bin", bytes(range(256)) * 4)
    resp, content = raw(emulator, "GET", f"drive/v2/files/{fid}?alt=media", headers={"Range": "bytes=10-19"})
    assert resp.status == 206 and content == bytes(range(10, 20)) and resp["content-range"] == "bytes 10-19/1024"
    resp, content = raw(emulator, "GET", f"drive/v2/files/{fid}?alt=media", headers={"Range": "bytes=1000-"})
    assert resp.status == 206 and len(content) == 24
    resp, _ = raw(emulator, "GET", f"drive/v2/files/{fid}?alt=media", headers={"Range": "bytes=5000-"})
    assert resp.status == 416
    resp, content = raw(emulator, "GET", f"drive/v2/files/{fid}", token=False)
    assert resp.status == 401 and json.loads(content)["error"]["errors"][0]["reason"] == "required"
    resp, content = raw(emulator, "GET", f"drive/v2/files/{fid}", token="ya29.wrong")
    assert resp.status == 401 and json.loads(content)["error"]["code"] == 401


def test_token_endpoint(emulator):
    http = httplib2.Http()
    form = (f"grant_type=refresh_token&client_id={emulator.client_id}&client_secret={emulator.client_secret}"
            f"&refresh_token={emulator.refresh_token}")
    resp, content = http.request(emulator.token_uri, "POST", body=form,
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    token = json.loads(content)
    assert resp.status == 200 and token["expires_in"] == 3600
    assert raw(emulator, "GET", "drive/v2/about", token=token["access_token"])[0].status == 200
    emulator.revoke()
    resp, content = http.request(emulator.token_uri, "POST", body=form,
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status == 400 and json.loads(content)["error"] == "invalid_grant"
    assert raw(emulator, "GET", "drive/v2/about", token=token["access_token"])[0].status == 401


@pytest.mark.parametrize("kind,status,reason", [
    ("500", 500, "backendError"), ("503", 503, "backendError"), ("429", 429, "rateLimitExceeded"),
    ("rate_limit", 403, "rateLimitExceeded"), ("user_rate_limit", 403, "userRateLimitExceeded"),
    ("quota", 403, "storageQuotaExceeded"),
])
def test_error_faults_drain_the_body_and_keep_the_connection(emulator, kind, status, reason):
    token = emulator.issue_token()
    http = httplib2.Http()
    emulator.inject(kind, match="POST /upload/")
    url = emulator.url + "upload/drive/v2/files?uploadType=media"
    headers = {"Authorization": f"Bearer {token}"}
    resp, content = http.request(url, "POST", body=b"z" * 300_000, headers=headers)
    err = json.loads(content)["error"]
    assert resp.status == status and err["code"] == status and err["errors"][0]["reason"] == reason
    resp, _ = http.request(url, "POST", body=b"z" * 300_000, headers=headers)  # same connection, no fault left
    assert resp.status == 200
    assert [r.status for r in emulator.requests] == [status, 200]


def test_drop_and_slow_faults(emulator):
    fid = emulator.add_file("d.bin", b"q" * 4096)
    emulator.inject("drop", match="alt=media", after_bytes=100)
    with pytest.raises((httplib2.HttpLib2Error, OSError, http.client.HTTPException)):
        raw(emulator, "GET", f"drive/v2/files/{fid}?alt=media")
    emulator.inject("slow", delay=0.2, match=f"GET /drive/v2/files/{fid}")
    resp, _ = raw(emulator, "GET", f"drive/v2/files/{fid}")
    assert resp.status == 200 and emulator.requests[-1].fault == "slow"
    with pytest.raises(ValueError):
        emulator.inject("teapot")
