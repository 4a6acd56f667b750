"""Snapshots to Google Drive end to end: Guard → local staging → Drive API (emulator) → a fresh
runtime with nothing local lists, downloads, verifies and restores them."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

import nbguard
from nbguard.stores import open_store
from tests.drive_emulator import DriveEmulator


@pytest.fixture
def emulator(monkeypatch, tmp_path):
    emu = DriveEmulator().start()
    monkeypatch.setenv("NBGUARD_DRIVE_CREDENTIALS", json.dumps(emu.authorized_user_info()))
    monkeypatch.setenv("NBGUARD_DRIVE_API_ROOT", emu.url)
    monkeypatch.setenv("NBGUARD_STAGING", str(tmp_path / "staging"))
    yield emu
    emu.stop()


def uploaded_bytes(emu: DriveEmulator) -> int:
    total = 0
    for request in emu.requests:
        match = re.match(r"bytes (\d+)-(\d+)/", request.content_range or "")
        if request.method == "PUT" and match:
            total += int(match.group(2)) - int(match.group(1)) + 1
    return total


def frozen_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 4))
    for p in [*model[0].parameters(), *model[2].parameters()]:
        p.requires_grad_(False)
    opt = torch.optim.Adam(model[4].parameters(), lr=1e-2)
    return model, opt


def train(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    loss = model(torch.randn(8, 256)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_snapshots_reach_drive_verified_and_a_fresh_runtime_restores_them(emulator, tmp_path, monkeypatch):
    url = "gdrive://nbguard/integration"
    model, opt = frozen_model()
    train(model, opt)
    guard = nbguard.Guard(url, run="ft", report=None)
    guard.save({"model": model, "opt": opt}, position={"epoch": 1}).result()
    store = open_store(url)
    assert store.flush(60)
    first_upload = uploaded_bytes(emulator)
    assert guard.snapshots()[0].state == "verified"

    train(model, opt)  # only the head changes
    guard.save({"model": model, "opt": opt}, position={"epoch": 2}).result()
    assert store.flush(60)
    second_upload = uploaded_bytes(emulator) - first_upload
    head_and_adam = sum(p.numel() * 4 * 3 for p in model[4].parameters())
    print(f"\n[drive] first snapshot uploaded {first_upload} B, second {second_upload} B "
          f"(trainable head + Adam state: {head_and_adam} B)")
    assert second_upload < first_upload / 20
    assert second_upload <= 1.5 * head_and_adam + 64 * 1024  # + manifest and RNG states
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    # A fresh runtime: nothing local (another staging folder), a new model with other weights.
    monkeypatch.setenv("NBGUARD_STAGING", str(tmp_path / "fresh-staging"))
    from nbguard.stores import registry as store_module

    store_module.SHARED.staged_stores.clear()
    catalog = nbguard.Catalog(url)
    listed = catalog.snapshots("ft")
    assert [s.position["epoch"] for s in listed] == [2, 1]
    assert listed[0].state == "remote only"
    fresh, fresh_opt = frozen_model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    report = nbguard.load(url, "latest", run="ft").restore({"model": fresh, "opt": fresh_opt})
    assert ("model", "Sequential") in report.restored
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, expected[key]), key
    store_module.SHARED.staged_stores.clear()


def test_drive_quota_full_is_reported_once_and_training_goes_on(emulator, capfd):
    messages: list[str] = []
    model, opt = frozen_model()
    url = "gdrive://nbguard/quota"
    guard = nbguard.Guard(url, run="q", report=messages.append)
    emulator.inject("quota", times=1000, match="upload")
    for epoch in range(3):
        train(model, opt)
        guard.save({"model": model, "opt": opt}, position={"epoch": epoch}).result()  # local commits succeed
    store = open_store(url)
    store.flush(5)
    assert len(guard.snapshots()) >= 1 and all(s.state != "verified" for s in guard.snapshots())
    err = capfd.readouterr().err
    assert err.count("Google Drive is full") == 1, err
    assert messages == []  # local saves succeeded: nothing wrong with the training side
    from nbguard.stores import registry as store_module

    store_module.SHARED.staged_stores.clear()
    store.close(1)
