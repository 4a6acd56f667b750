"""JupyterLab + headless Chromium for browser tests (the recipe in FIELD-NOTES, "Testing for real here").

    with JupyterLab(root=tmp_path / "lab", home=tmp_path / "jupyter") as lab, chromium() as browser:
        page = browser.new_page(viewport={"width": 1100, "height": 1400})
        nb = LabNotebook.open(page, lab, "demo.ipynb")
        nb.run_cell(0)
        print(nb.output_text(0))

The server gets a token, 127.0.0.1, a free port, and its own JUPYTER_CONFIG_DIR/DATA_DIR/RUNTIME_DIR
and settings under ``home``, so nothing leaks between runs or from the user's own set-up. Kernels are
shut down through the REST API before the server stops.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]
LAB_FLAGS = [
    "--allow-root", "--no-browser", "--ip=127.0.0.1", "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
    "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
]
# Every cell attached to the DOM: with virtual scrolling, off-screen outputs would be missing.
LAB_SETTINGS = {"@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"}}


def missing() -> str | None:
    """Why browser tests cannot run here, or None when they can."""
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing: apt-get install -y chromium (scripts/setup.sh --dev does it as root)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed: pip install playwright (no browser download needed)"
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        return "jupyterlab is not installed: pip install jupyterlab"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterLab:
    """A JupyterLab server serving ``root``, isolated under ``home``."""

    def __init__(self, root: str | os.PathLike[str], home: str | os.PathLike[str], *, timeout: float = 60.0):
        self.root, self.home = Path(root), Path(home)
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self.log = self.home / "jupyterlab.log"

    def __enter__(self) -> JupyterLab:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        dirs = {name: self.home / sub for name, sub in (
            ("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"), ("JUPYTER_RUNTIME_DIR", "runtime"),
            ("JUPYTERLAB_SETTINGS_DIR", "settings"), ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"), ("IPYTHONDIR", "ipython"))}
        for path in dirs.values():
            path.mkdir(parents=True, exist_ok=True)
        return {**os.environ, **{k: str(v) for k, v in dirs.items()}, "JUPYTER_PLATFORM_DIRS": "1",
                "PYTHONUNBUFFERED": "1"}

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        env = self.env()
        for name, values in LAB_SETTINGS.items():
            path = Path(env["JUPYTERLAB_SETTINGS_DIR"]) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jupyterlab", *LAB_FLAGS, f"--port={self.port}",
                 f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}"],
                cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                self.api("GET", "/api/status")
                return
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"jupyter lab did not answer within {self.timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """A REST call (JSON in and out); raises urllib.error.HTTPError on a 4xx/5xx answer."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Authorization": f"token {self.token}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read()
        return json.loads(text) if text else None

    def lab_url(self, path: str = "") -> str:
        return f"{self.url}/lab/tree/{path}?token={self.token}"

    def kernels(self) -> list[dict[str, Any]]:
        return self.api("GET", "/api/kernels")

    def restart_kernel(self, kernel_id: str) -> None:
        self.api("POST", f"/api/kernels/{kernel_id}/restart")

    def shutdown_kernels(self) -> None:
        for kernel in self.kernels():
            with contextlib.suppress(OSError):
                self.api("DELETE", f"/api/kernels/{kernel['id']}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(OSError):
            self.shutdown_kernels()
        os.killpg(self.proc.pid, signal.SIGTERM)  # the server's own session: the server and its kernels
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@contextlib.contextmanager
def chromium(**launch: Any) -> Iterator[Any]:
    """A headless Chromium (Debian's, not a Playwright download) with a fresh profile."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, **launch)
        try:
            yield browser
        finally:
            browser.close()


KERNEL_READY = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const ctx = w && w.sessionContext;
  const k = ctx && ctx.session && ctx.session.kernel;
  return !!(ctx && ctx.isReady && k && k.connectionStatus === 'connected' && k.status === 'idle');
}"""


class LabNotebook:
    """The notebook open in a JupyterLab page, driven through ``window.jupyterapp``.

    Commands are started without returning their promise from ``page.evaluate`` (that hangs);
    completion is read back from the models instead."""

    def __init__(self, page: Any, lab: JupyterLab):
        self.page, self.lab = page, lab

    @classmethod
    def open(cls, page: Any, lab: JupyterLab, path: str, timeout: float = 60.0) -> LabNotebook:
        page.goto(lab.lab_url(path))
        page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget "
                               "&& window.jupyterapp.shell.currentWidget.content "
                               "&& window.jupyterapp.shell.currentWidget.content.widgets", timeout=timeout * 1000)
        notebook = cls(page, lab)
        notebook.wait_ready(timeout)
        return notebook

    def wait_ready(self, timeout: float = 60.0) -> None:
        self.page.wait_for_function(KERNEL_READY, timeout=timeout * 1000)

    def fit_width(self, width: int = 900) -> int:
        """Collapse the side areas and size the window so the notebook panel is ``width`` px wide."""
        self.page.evaluate("() => { window.jupyterapp.shell.collapseLeft(); window.jupyterapp.shell.collapseRight(); }")
        self.page.wait_for_timeout(300)
        for _ in range(3):
            current = self.page.evaluate("() => window.jupyterapp.shell.currentWidget.node.getBoundingClientRect().width")
            if abs(current - width) < 1:
                break
            size = self.page.viewport_size
            self.page.set_viewport_size({"width": int(size["width"] + width - current), "height": size["height"]})
            self.page.wait_for_timeout(300)
        return int(current)

    def run_cell(self, index: int, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Run one cell, wait for it and for an idle kernel; returns its outputs (nbformat JSON).
        An error output raises AssertionError with the traceback text."""
        self.page.evaluate("""(i) => {
            const nb = window.jupyterapp.shell.currentWidget;
            nb.content.activeCellIndex = i;
            nb.content.widgets[i].model.executionCount = null;
            window.jupyterapp.commands.execute('notebook:run-cell');
        }""", index)
        self.page.wait_for_function("""(i) => {
            const nb = window.jupyterapp.shell.currentWidget;
            const k = nb.sessionContext.session && nb.sessionContext.session.kernel;
            return nb.content.widgets[i].model.executionCount !== null && k && k.status === 'idle';
        }""", arg=index, timeout=timeout * 1000)
        outputs = self.outputs(index)
        for out in outputs:
            if out.get("output_type") == "error":
                raise AssertionError(f"cell {index} failed: {out.get('ename')}: {out.get('evalue')}\n"
                                     + "\n".join(out.get("traceback", [])))
        return outputs

    def outputs(self, index: int) -> list[dict[str, Any]]:
        return self.page.evaluate("(i) => window.jupyterapp.shell.currentWidget.content.widgets[i].model.outputs.toJSON()",
                                  index)

    def output_text(self, index: int) -> str:
        """What the cell's output area shows, as text from the DOM."""
        return self.page.evaluate("""(i) => {
            const area = window.jupyterapp.shell.currentWidget.content.widgets[i].node.querySelector('.jp-OutputArea');
            return area ? area.innerText : '';
        }""", index)

    def output(self, index: int) -> Any:
        """A Playwright locator of the cell's output area."""
        return self.page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-OutputArea")

    def restart_kernel(self, timeout: float = 60.0) -> None:
        """Restart the kernel as the UI does (the kernel connection's restart(), a REST call the page
        awaits) and wait until it is idle again."""
        self.page.evaluate("""() => {
            window.__restarted = null;
            window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.restart().then(
                () => { window.__restarted = 'ok'; }, (e) => { window.__restarted = 'failed: ' + e; });
        }""")
        self.page.wait_for_function("() => window.__restarted !== null", timeout=timeout * 1000)
        outcome = self.page.evaluate("() => window.__restarted")
        if outcome != "ok":
            raise AssertionError(f"kernel restart {outcome}")
        self.wait_ready(timeout)


def copy_if_wanted(src: Path, dest: Path) -> bool:
    """Copy a screenshot into the docs when asked (NBGUARD_UPDATE_DOCS=1) or when the docs lack one."""
    if os.environ.get("NBGUARD_UPDATE_DOCS") == "1" or not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        return True
    return False
