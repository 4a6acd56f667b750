"""A real Jupyter kernel for end-to-end tests: run cells, watch output, SIGKILL it, start again."""

from __future__ import annotations

import os
import queue
import signal
import sys
import time
from collections.abc import Callable

from jupyter_client import KernelManager

_STEP_COUNTER = """
import sys
from torch.optim.optimizer import register_optimizer_step_post_hook
sys._test_optimizer_steps = [0]
def count(optimizer, args, kwargs):
    sys._test_optimizer_steps[0] += 1
register_optimizer_step_post_hook(count)
"""

_STEP_KILLER = """
import os, signal, threading
from torch.optim.optimizer import register_optimizer_step_post_hook
steps = [0]
def kill_after(optimizer, args, kwargs):
    steps[0] += 1
    if steps[0] == AFTER_STEP:
        threading.Timer(DELAY, os.kill, (os.getpid(), signal.SIGKILL)).start()
register_optimizer_step_post_hook(kill_after)
"""


class Kernel:
    """One ipykernel process running this venv's Python."""

    def __init__(self, cwd: str, env: dict[str, str] | None = None):
        self.cwd = cwd
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.km: KernelManager | None = None
        self.start()

    def start(self) -> None:
        self.km = KernelManager(kernel_name="python3")
        self.km.kernel_spec.argv[0] = sys.executable
        self.km.start_kernel(cwd=self.cwd, env=self.env)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def run(self, code: str, *, timeout: float = 180, until: Callable[[str], bool] | None = None) -> tuple[str, str | None]:
        """Execute ``code``; returns (all text output, error name or None). With ``until``, returns as
        soon as the output so far satisfies it, leaving the cell running."""
        msg_id = self.kc.execute(code)
        text, error = [], None
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"cell did not finish in {timeout} s; output so far:\n{''.join(text)}") from None
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                text.append(content["text"])
            elif kind in ("execute_result", "display_data"):
                text.append(content["data"].get("text/plain", "") + "\n")
            elif kind == "error":
                error = content["ename"]
                text.append("\n".join(content["traceback"]))
            elif kind == "status" and content["execution_state"] == "idle":
                return "".join(text), error
            if until is not None and until("".join(text)):
                return "".join(text), None

    def count_optimizer_steps(self) -> None:
        """From now on, count every optimizer step the kernel takes (read with ``optimizer_steps``)."""
        self._exec_private(_STEP_COUNTER)

    def optimizer_steps(self) -> int:
        out, error = self.run("import sys; print('STEPS', sys._test_optimizer_steps[0])")
        assert error is None, out
        return int(out.split("STEPS")[1])

    def kill_during(self, code: str, *, after_step: int, delay: float, timeout: float = 180) -> str:
        """Execute ``code`` and SIGKILL the kernel from inside ``delay`` s after its ``after_step``-th
        optimizer step; returns the output so far. Armed by the kernel's own progress, not by when its
        output reaches us, so the kill lands in the cell however loaded the machine; a cell that ends
        before it fails the test."""
        self._exec_private(_STEP_KILLER.replace("AFTER_STEP", str(after_step)).replace("DELAY", repr(delay)))
        out, killed = self.run_until_dead(code, timeout=timeout)
        assert killed, f"the cell ended before step {after_step}'s kill; output:\n{out}"
        return out

    def run_until_dead(self, code: str, *, timeout: float = 120,
                       kill_when: Callable[[str], bool] | None = None, delay: float = 0.0) -> tuple[str, bool]:
        """Execute ``code`` until the cell ends (False) or the kernel dies (True). With ``kill_when``:
        SIGKILL the kernel ``delay`` s after its output first satisfies it."""
        assert self.km is not None
        msg_id = self.kc.execute(code)
        text: list[str] = []
        deadline = time.monotonic() + timeout
        kill_at: float | None = None
        while time.monotonic() < deadline:
            if kill_at is not None and time.monotonic() >= kill_at:
                self.kill()
                return "".join(text), True
            try:
                msg = self.kc.get_iopub_msg(timeout=0.02 if kill_at is not None else 0.2)
            except queue.Empty:
                if not self.km.is_alive():
                    return "".join(text), True
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                text.append(content["text"])
            elif kind == "error":
                text.append("\n".join(content["traceback"]))
            elif kind == "status" and content["execution_state"] == "idle":
                return "".join(text), False
            if kill_when is not None and kill_at is None and kill_when("".join(text)):
                kill_at = time.monotonic() + delay
        raise TimeoutError(f"cell did not finish in {timeout} s; output so far:\n{''.join(text)}")

    def _exec_private(self, source: str) -> None:
        # exec in a throwaway namespace: nothing lands in the user's variables, which nbguard watches.
        out, error = self.run(f"exec({source!r}, {{}})")
        assert error is None, out

    def kill(self) -> None:
        """SIGKILL the kernel process: what a VM loss or a forced restart does."""
        assert self.km is not None
        os.kill(self.km.provisioner.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.km.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self) -> None:
        """A fresh kernel process, as after reconnecting."""
        self.shutdown()
        self.start()

    def shutdown(self) -> None:
        if self.km is None:
            return
        try:
            self.kc.stop_channels()
        finally:
            if self.km.is_alive():
                self.km.shutdown_kernel(now=True)
            else:
                self.km.cleanup_resources()
            self.km = None
