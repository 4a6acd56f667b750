"""Storage faults: a full disk mid-save, permission denied, a read-only folder, a mount folder that
disappears, storage slower than the save cadence, and Drive API errors.

In every case: training goes on (the loop or cell completes), one clear message says what happened
and what to do (asserted, and that it comes once), no earlier snapshot is harmed (verified), and saving
recovers by itself once the fault clears (a later snapshot appears).

Faults are real where this machine allows it (it needs root): a 2 MiB tmpfs for ENOSPC, ``chattr +i``
for EPERM, a read-only bind mount for EROFS. Where mounting is refused, the full disk falls back to the
``LocalStore.on_event`` seam raising ``OSError(ENOSPC)`` at a real write, and the others are skipped.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest

from nbguard import Catalog, Guard, LocalStore, StoreError
from nbguard.stores import TEMP_PREFIX
from tests import crash_harness as ch

RUN = "faults"


# -- real faults, where the machine allows them ---------------------------------------------------------------
def _run(*argv: str) -> bool:
    try:
        return subprocess.run(list(argv), capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@contextlib.contextmanager
def small_disk(path: Path, size: str = "2m"):
    """A tmpfs of ``size`` mounted at ``path``; yields None where mounting is refused (not root)."""
    path.mkdir(parents=True, exist_ok=True)
    if not _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)):
        yield None
        return
    try:
        yield path
    finally:
        _run("umount", "-l", str(path))


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(disk: Path, leave: int) -> Path:
    """Fill the disk until only ``leave`` bytes are free."""
    filler = disk / "filler"
    try:
        with open(filler, "ab") as fh:
            fh.write(b"\0" * max(0, free_bytes(disk) - leave))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:  # a save in flight took some of the space first: the disk is full either way
        if exc.errno != errno.ENOSPC:
            raise
    return filler


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(f"{TEMP_PREFIX}*")]


class Trainer:
    """The crash harness's training, saved through a Guard, one save per step."""

    def __init__(self, guard: Guard):
        self.guard = guard
        self.t = ch.make_training()
        self.steps = 0

    def step_and_save(self):
        ch.train_step(self.t)
        self.steps += 1
        handle = self.guard.save(ch.state_of(self.t), position={"step": self.steps})
        handle.wait(60)
        return handle

    def assert_latest_restores_exactly(self, location) -> None:
        expected = ch.digest(self.t)
        fresh = ch.make_training()
        report = Guard(location, run=RUN, report=None).restore(ch.state_of(fresh))
        fresh["history"][:] = report.values["history"]
        assert report.position["step"] == self.steps
        assert ch.digest(fresh) == expected


def assert_intact(location, ids: list[str]) -> None:
    catalog = Catalog(location)
    listed = [s.id for s in catalog.snapshots(RUN)]
    assert all(i in listed for i in ids), (ids, listed)
    assert catalog.verify(RUN) == {} and catalog.problems == {}


# -- a full disk ----------------------------------------------------------------------------------------------
def test_a_disk_that_fills_up_mid_save_is_reported_once_and_saving_recovers(tmp_path):
    with small_disk(tmp_path / "disk") as mounted:
        full = {"on": False}
        events: list[tuple[str, str]] = []

        def hook(kind: str, path: str) -> None:
            events.append((kind, path))
            if mounted is None and full["on"] and kind == "write" and path.startswith("blobs/"):
                if sum(1 for k, p in events if k == "write" and p == path) >= 3:  # a few chunks made it
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        root = tmp_path / "disk" / "store"
        store = LocalStore(root, on_event=hook)
        reports: list[str] = []
        trainer = Trainer(Guard(store, run=RUN, keep=100, report=reports.append))
        good = [trainer.step_and_save().result() for _ in range(2)]

        filler = fill(mounted, leave=trainer.guard.last_stats.written_bytes // 2) if mounted else None
        full["on"] = True
        before = len(events)
        failed = [trainer.step_and_save() for _ in range(4)]  # training goes on
        assert all(isinstance(h.exception(), StoreError) for h in failed)
        assert all(h.exception().__cause__.errno == errno.ENOSPC for h in failed)
        first_blob = next(p for k, p in events[before:] if k == "create")
        assert sum(1 for k, p in events[before:] if k == "write" and p == first_blob) >= 2, "not mid-save"
        assert len(reports) == 1, reports
        assert "the disk is full: free some space or choose another folder" in reports[0]
        assert "Training goes on; earlier snapshots are intact and the next save tries again" in reports[0]
        assert_intact(store, [g.id for g in good])
        assert [s.id for s in Catalog(store).snapshots(RUN)] == [g.id for g in reversed(good)]
        assert temp_files(root) == [], "a failed write left a temporary file"

        if filler is not None:
            filler.unlink()
        full["on"] = False
        recovered = trainer.step_and_save().result()  # by itself: nothing to call
        assert Catalog(store).snapshots(RUN)[0].id == recovered.id
        assert_intact(store, [g.id for g in good] + [recovered.id])
        trainer.assert_latest_restores_exactly(store)
        assert reports[1:] == ["saving works again"], reports
        print(f"\nENOSPC from {'a 2 MiB tmpfs' if mounted else 'the on_event seam (mount refused)'}")


def test_a_second_outage_after_recovery_is_reported_again(tmp_path):
    full = {"on": False}

    def hook(kind: str, path: str) -> None:
        if full["on"] and kind == "write":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    reports: list[str] = []
    trainer = Trainer(Guard(LocalStore(tmp_path / "store", on_event=hook), run=RUN, report=reports.append))
    for outage in range(2):
        trainer.step_and_save().result()
        full["on"] = True
        assert isinstance(trainer.step_and_save().exception(), StoreError)
        full["on"] = False
        trainer.step_and_save().result()
        assert sum("disk is full" in r for r in reports) == outage + 1, reports


SHELL_SETUP = textwrap.dedent("""
    import torch
    from torch import nn
    torch.manual_seed(0)
    model = nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    history = []
""")

DISK_CELL = textwrap.dedent("""
    for step in range(10):
        if step == 3:
            fill_disk()
        if step == 7:
            free_disk()
        loss = model(torch.randn(8, 64)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        history.append(loss.item())
        time.sleep(0.05)  # a save per iteration: --every-iter skips a save while the previous one is in flight
""")


@pytest.fixture
def shell(tmp_path, monkeypatch):
    yield from ch.ipython_shell(tmp_path, monkeypatch)


def test_a_full_disk_under_checkpointed_is_reported_once_and_the_cell_completes(shell, tmp_path, capsys):
    with small_disk(tmp_path / "disk") as mounted:
        if mounted is None:
            pytest.skip("mounting a tmpfs is refused here (needs root); the Guard-level test covers the seam")
        store_dir = mounted / "store"
        shell.run_cell("import time\n" + SHELL_SETUP)
        shell.user_ns["fill_disk"] = lambda: fill(mounted, leave=64 * 64 * 4)
        shell.user_ns["free_disk"] = lambda: (mounted / "filler").unlink()
        result = shell.run_cell(f"%%checkpointed --dir {store_dir} --name full --every-iter 1 --state model,opt,history\n"
                                + DISK_CELL)
        assert result.success, result.error_in_exec
        assert len(shell.user_ns["history"]) == 10
        out = capsys.readouterr().out
        said = [line for line in out.splitlines() if "disk is full" in line]
        assert len(said) == 1, out
        assert "free some space or choose another folder" in said[0] and "Training goes on" in said[0]
        catalog = Catalog(str(store_dir))
        snapshots = catalog.snapshots("full")
        assert catalog.verify() == {} and catalog.problems == {}
        assert "final" in snapshots[0].tags, "saving did not recover after the disk was freed"
        assert snapshots[0].position.get("completed") is True
        assert temp_files(store_dir) == []


# -- permission denied, read-only ---------------------------------------------------------------------------
@contextlib.contextmanager
def immutable(root: Path):
    if not _run("chattr", "-R", "+i", str(root)):
        pytest.skip("chattr +i is not available here (needs root and ext4)")
    try:
        yield
    finally:
        _run("chattr", "-R", "-i", str(root))


@contextlib.contextmanager
def read_only(root: Path):
    if not (_run("mount", "--bind", str(root), str(root)) and _run("mount", "-o", "remount,ro,bind", str(root))):
        _run("umount", str(root))
        pytest.skip("a read-only bind mount is refused here (needs root)")
    try:
        yield
    finally:
        _run("umount", "-l", str(root))


@pytest.mark.parametrize(("fault", "hint"), [
    (immutable, "permission denied: choose a folder you can write to"),
    (read_only, "the folder is read-only: choose a folder you can write to"),
], ids=["permission-denied", "read-only"])
def test_a_folder_that_refuses_writes_is_reported_once_and_saving_recovers(tmp_path, fault, hint):
    root = tmp_path / "store"
    reports: list[str] = []
    trainer = Trainer(Guard(str(root), run=RUN, keep=100, report=reports.append))
    good = [trainer.step_and_save().result() for _ in range(2)]
    with fault(root):
        failed = [trainer.step_and_save() for _ in range(3)]
        assert all(isinstance(h.exception(), StoreError) for h in failed)
        assert len(reports) == 1 and hint in reports[0], reports
        assert "earlier snapshots are intact" in reports[0]
        assert_intact(str(root), [g.id for g in good])
    recovered = trainer.step_and_save().result()
    assert_intact(str(root), [g.id for g in good] + [recovered.id])
    assert Catalog(str(root)).snapshots(RUN)[0].id == recovered.id
    trainer.assert_latest_restores_exactly(str(root))
    assert reports[1:] == ["saving works again"], reports
    assert temp_files(root) == []


# -- a mount folder that disappears -------------------------------------------------------------------------------
def test_a_mount_folder_renamed_away_mid_run_is_reported_once_and_copying_resumes(tmp_path, monkeypatch, capfd):
    """A replicated store (local staging, copied to a mounted folder): the mount's folder is renamed away
    while training goes on, then comes back; nothing is recreated under the dropped mount."""
    from nbguard.stores import open_store

    mnt = tmp_path / "mnt"
    (mnt / "store").mkdir(parents=True)
    monkeypatch.setenv("NBGUARD_MOUNT_PREFIXES", str(mnt))
    monkeypatch.setenv("NBGUARD_STAGING", str(tmp_path / "staging"))
    location = str(mnt / "store")
    store = open_store(location)
    assert type(store).__name__ == "ReplicatedStore" and store.remote_kind == "mount"
    reports: list[str] = []
    trainer = Trainer(Guard(store, run=RUN, keep=100, report=reports.append))
    good = [trainer.step_and_save().result() for _ in range(2)]
    assert store.flush(30)
    assert_intact(LocalStore(mnt / "store"), [g.id for g in good])
    capfd.readouterr()

    gone = tmp_path / "mnt-gone"
    mnt.rename(gone)  # the mount drops
    during = [trainer.step_and_save().result() for _ in range(3)]  # saves land locally, training goes on
    assert not store.flush(1.0)
    assert not mnt.exists(), "the store folder was recreated on the VM's disk under the dropped mount"
    err = capfd.readouterr().err
    said = [line for line in err.splitlines() if "not reachable" in line]
    assert len(said) == 1, err
    assert "the folder is gone" in said[0] and "Reconnect Drive" in said[0] and "copied to Drive by" in said[0]
    assert_intact(LocalStore(gone / "store"), [g.id for g in good])  # the remote copies are unharmed
    assert trainer.guard.last_error is None and reports == []

    gone.rename(mnt)  # the mount is back
    assert store.flush(30), "copying did not resume by itself"
    err = capfd.readouterr().err
    assert sum("mount is back" in line for line in err.splitlines()) == 1, err
    assert "not reachable" not in err
    remote = LocalStore(mnt / "store")
    assert_intact(remote, [g.id for g in good] + [d.id for d in during])
    assert Catalog(remote).snapshots(RUN)[0].id == during[-1].id


# -- slow storage --------------------------------------------------------------------------------------------------
SLOW_CELL = textwrap.dedent("""
    started = time.monotonic()
    for step in range(40):
        loss = model(torch.randn(8, 64)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        history.append(loss.item())
        time.sleep(0.1)
    loop_time = time.monotonic() - started
""")


def _rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def test_storage_slower_than_the_save_cadence_coalesces_saves_without_queueing(shell, tmp_path):
    """--every 0.1s against a store whose every write sleeps 1 s (2 s a save: blob and manifest): saves
    coalesce (at most one per second, none queued), staging memory stays one copy of the state, and the
    training loop is not slowed down."""
    from nbguard.training.session import CellOptions

    shell.run_cell("import time\n" + SHELL_SETUP)
    session = ch.current_session()
    guard = session.guard(CellOptions(every=0.1), "slow")

    def slow(kind: str, path: str) -> None:
        if kind == "create":  # once per write
            time.sleep(1.0)

    guard.store.on_event = slow
    samples: list[tuple[int, int, bool]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            samples.append((guard._staging.buffer_bytes, _rss(), guard._writer.busy))

    sampler = threading.Thread(target=sample, daemon=True)
    rss_before = _rss()
    sampler.start()
    started = time.monotonic()
    result = shell.run_cell("%%checkpointed --every 0.1s --name slow --state model,opt,history\n" + SLOW_CELL)
    elapsed = time.monotonic() - started
    stop.set()
    sampler.join()
    assert result.success, result.error_in_exec
    saves = session.last_cell.saves
    snapshots = Catalog(os.environ["NBGUARD_DIR"]).snapshots("slow")
    state_bytes = sum(p.numel() * 4 for p in shell.user_ns["model"].parameters()) * 2  # weights + momentum
    print(f"\n{saves} saves in {elapsed:.1f} s with a 1 s store and --every 0.1s; "
          f"staging at most {max(s[0] for s in samples)} bytes; RSS +{(max(s[1] for s in samples) - rss_before) >> 20} MiB")
    assert 2 <= saves <= elapsed / 1.0 + 1, (saves, elapsed)
    assert shell.user_ns["loop_time"] < 40 * 0.1 + 1.0, "the training loop waited for the slow store"
    assert max(s[0] for s in samples) <= 2 * state_bytes + 4096, "staging buffers grew"
    assert max(s[1] for s in samples) - rss_before < 64 << 20, "memory grew while saves were slow"
    assert Catalog(os.environ["NBGUARD_DIR"]).verify() == {}
    assert "final" in snapshots[0].tags


# -- Drive API errors ------------------------------------------------------------------------------------------------
DRIVE_HINTS = {
    "500": "it is probably a Drive outage; try again later",
    "503": "it is probably a Drive outage; try again later",
    "429": "kept rate-limiting requests (rateLimitExceeded)",
    "rate_limit": "kept rate-limiting requests (rateLimitExceeded)",
    "user_rate_limit": "kept rate-limiting requests (userRateLimitExceeded)",
    "quota": "Google Drive is full (storageQuotaExceeded)",
}
DRIVE_ADVICE = {
    "500": "try again later", "503": "try again later", "429": "wait a few minutes",
    "rate_limit": "wait a few minutes", "user_rate_limit": "wait a few minutes",
    "quota": "free space in Drive and empty its trash",
}


@pytest.fixture
def emulator():
    from tests.drive_emulator import DriveEmulator

    with DriveEmulator() as emu:
        yield emu
        assert emu.errors == [], emu.errors[0]


def drive_store(emulator, tmp_path, reports):
    from nbguard.stores.drive import DriveStore, RetryPolicy
    from nbguard.stores.replica import ReplicatedStore

    remote = DriveStore("gdrive://nbguard/faults", credentials=emulator.authorized_user_info(), api_root=emulator.url,
                        retry=RetryPolicy(attempts=3, base_delay=0.005, max_delay=0.02),
                        cache_dir=str(tmp_path / "drive-cache"))
    store = ReplicatedStore(LocalStore(tmp_path / "staging"), remote, report=reports.append,
                            retry_interval=0.05, max_retry_interval=0.2)
    return store, remote


def wait_until(predicate, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("kind", sorted(DRIVE_HINTS))
def test_drive_api_errors_are_reported_once_and_copying_resumes(emulator, tmp_path, kind):
    reports: list[str] = []
    store, remote = drive_store(emulator, tmp_path, reports)
    trainer = Trainer(Guard(store, run=RUN, keep=100, report=reports.append))
    good = [trainer.step_and_save().result() for _ in range(2)]
    assert store.flush(30)
    assert_intact(remote, [g.id for g in good])

    emulator.inject(kind, times=10**6, match="/upload/")
    during = [trainer.step_and_save().result() for _ in range(3)]  # local saves succeed: training goes on
    assert wait_until(lambda: any("failed" in r for r in reports)), reports
    time.sleep(0.5)  # several retries happen meanwhile; still one message
    failures = [r for r in reports if "failed" in r]
    assert len(failures) == 1, reports
    assert DRIVE_HINTS[kind] in failures[0] and DRIVE_ADVICE[kind] in failures[0], failures[0]
    assert "Snapshots are kept on this machine's disk" in failures[0]
    assert_intact(remote, [g.id for g in good])  # nothing earlier harmed, nothing partial listed
    assert trainer.guard.last_error is None

    emulator.clear_faults()
    assert store.flush(30), "copying did not resume by itself"
    assert sum(bool(re.search(r"works again \(\d+ waiting\)", r)) for r in reports) == 1, reports
    assert_intact(remote, [g.id for g in good] + [d.id for d in during])
    assert Catalog(remote).snapshots(RUN)[0].id == during[-1].id
    store.close(5)


# -- secrets ---------------------------------------------------------------------------------------------------------
SECRET_CELL = textwrap.dedent("""
    for step in range(6):
        loss = model(torch.randn(8, 64)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        history.append(loss.item())
        time.sleep(0.05)
""")


def test_credentials_and_tokens_never_reach_snapshots_logs_or_errors(shell, tmp_path, monkeypatch, capfd, caplog):
    """Planted secrets (refresh token, client secret, an access token) in NBGUARD_DRIVE_CREDENTIALS; a Drive
    save with 503s and a 401, %nbguard drive/status/list, then revoked credentials (a failing refresh). No
    file in the staging, cache, temp or Drive folders, no output, log record or exception text may contain
    any of them, nor any access token the token endpoint handed out."""
    import json
    import logging
    import traceback

    import nbguard.stores
    from nbguard.stores.drive import DriveStore
    from tests.drive_emulator import DriveEmulator

    caplog.set_level(logging.DEBUG)
    folder = f"nbguard/secrets-{tmp_path.name}"
    url = f"gdrive://{folder}"
    planted_access = "ya29.PLANTED-access-token-c0ffee"
    issued: list[str] = []
    errors: list[str] = []
    with DriveEmulator() as emu:
        issue = emu.issue_token
        emu.issue_token = lambda: issued.append(issue()) or issued[-1]  # type: ignore[method-assign]
        emu.client_secret = "PLANTED-client-secret-7f3a9c"
        emu.refresh_token = "1//PLANTED-refresh-token-b41d2e"
        secrets = [emu.client_secret, emu.refresh_token, planted_access]
        info = {**emu.authorized_user_info(), "token": planted_access, "expiry": "2999-01-01T00:00:00Z"}
        monkeypatch.setenv("NBGUARD_DRIVE_CREDENTIALS", json.dumps(info))
        monkeypatch.setenv("NBGUARD_DRIVE_API_ROOT", emu.url)
        monkeypatch.setenv("NBGUARD_STAGING", str(tmp_path / "staging"))
        monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
        (tmp_path / "tmp").mkdir()
        emu.inject("503", times=2, match="PUT /upload/")
        emu.inject("auth", times=1, match="GET /drive/v2/files")
        try:
            shell.run_cell("import time\n" + SHELL_SETUP)
            shell.run_line_magic("nbguard", f"drive {folder}")
            result = shell.run_cell("%%checkpointed --every-iter 1 --name secret\n" + SECRET_CELL)
            assert result.success, result.error_in_exec
            store = nbguard.stores.registry.SHARED.staged_stores[url]
            assert store.flush(60), "the snapshots did not reach Drive"
            shell.run_line_magic("nbguard", "status")
            shell.run_line_magic("nbguard", "list")

            emu.revoke()  # every access token invalid, the refresh token refused
            shell.run_line_magic("nbguard", "save --note after-revoke")
            assert wait_until(lambda: store.last_error is not None, 30)
            shell.run_line_magic("nbguard", "status")
            errors.append(store.last_error or "")
            with pytest.raises(StoreError) as failing:  # the failing auth, as a script sees it
                DriveStore(url + "-direct", credentials=info, api_root=emu.url,
                           cache_dir=str(tmp_path / "direct-cache")).write("x/y.bin", [b"data"])
            errors += ["".join(traceback.format_exception(failing.value)), repr(failing.value)]
            assert "refresh" in errors[0] and "NBGUARD_DRIVE_CREDENTIALS" in errors[0], errors[0]
        finally:
            store = nbguard.stores.registry.SHARED.staged_stores.pop(url, None)
            if store is not None:
                store.close(2)
        drive_files = [(f["title"], emu.content(f["id"])) for f in emu.files() if "fileSize" in f]
    out = capfd.readouterr()
    texts = {"stdout": out.out, "stderr": out.err, "errors": "\n".join(errors),
             "logs": "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)}
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(title.endswith(".json") for title, _ in drive_files) and any(p.suffix == ".json" for p in files)
    assert issued, "the emulator handed out no access token"
    for secret in secrets + issued:
        for name, text in texts.items():
            assert secret not in text, f"a secret leaked into {name}"
        for path in files:
            assert secret.encode() not in path.read_bytes(), f"a secret leaked into {path}"
        for title, data in drive_files:
            assert secret.encode() not in data, f"a secret leaked into {title} on Drive"
    print(f"\n{len(secrets) + len(issued)} secrets checked against {len(files)} local files, {len(drive_files)} "
          f"Drive files, {len(caplog.records)} log records and {sum(map(len, texts.values()))} characters of output "
          "and error text")
