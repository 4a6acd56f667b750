"""A BatchNorm CNN (running statistics written by a native kernel without version bumps, eval-mode
accuracy choosing the best weights) SIGKILLed mid-training in a real kernel and re-run ends bitwise
identical to an uninterrupted run without nbguard."""

from __future__ import annotations

import random
import textwrap

import pytest

from tests.kernel_harness import Kernel
from tests.test_kernel_e2e import _digest

pytestmark = pytest.mark.e2e

SETUP = textwrap.dedent("""
    import copy, time, torch
    from torch import nn
    torch.manual_seed(0); torch.set_num_threads(1)
    X = torch.randn(96, 3, 8, 8); Y = (X[:, 0].mean((1, 2)) > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=12, shuffle=True)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    best_acc, best_wts, accs = 0.0, copy.deepcopy(model.state_dict()), []
""")

LOOP = textwrap.dedent("""
    for epoch in range(8):
        model.train()
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
            time.sleep(0.06)
        model.eval()
        with torch.no_grad():
            acc = (model(X).argmax(1) == Y).float().mean().item()
        accs.append(acc)
        if KEEP_BEST and acc > best_acc:
            best_acc, best_wts = acc, copy.deepcopy(model.state_dict())
        print("epoch", epoch, flush=True)
""")

DIGEST = textwrap.dedent("""
    import hashlib
    h = hashlib.sha256()
    for k, v in list(model.state_dict().items()) + list(best_wts.items()):
        h.update(k.encode()); h.update(v.numpy().tobytes())
    h.update(repr((accs, best_acc)).encode())
    print("DIGEST", h.hexdigest())
""")


@pytest.mark.parametrize("keep_best", [False, True], ids=["plain", "best-weights"])
def test_killed_batchnorm_cnn_resumes_bitwise(tmp_path, keep_best):
    loop = LOOP.replace("KEEP_BEST", str(keep_best))
    kernel = Kernel(str(tmp_path), env={"NBGUARD_DIR": str(tmp_path / "snaps"), "OMP_NUM_THREADS": "1"})
    try:
        kernel.count_optimizer_steps()
        kernel.run(SETUP)
        kernel.run(loop)
        expected = _digest(kernel.run(DIGEST)[0])
        steps = kernel.optimizer_steps()

        kernel.restart()
        kernel.run("%load_ext nbguard")
        kernel.run(SETUP)
        rng = random.Random(keep_best)
        kernel.kill_during("%%checkpointed --every 1s\n" + loop, after_step=rng.randint(steps // 2, steps * 8 // 10),
                           delay=rng.uniform(0.0, 0.1))

        kernel.restart()
        kernel.run("%load_ext nbguard")
        kernel.run(SETUP)
        out, error = kernel.run("%%checkpointed --every 1s\n" + loop)
        assert error is None, out
        assert "resumed from snapshot" in out, out
        assert _digest(kernel.run(DIGEST)[0]) == expected
    finally:
        kernel.shutdown()
