"""place: which platform, which notebook, which default folder. Shells are stand-ins whose class
path is the real one's; no kernel is needed."""

from __future__ import annotations

import http.server
import json
import os
import threading
import types

import pytest

from nbguard.stores.place import (
    AUTO,
    NotebookIdentity,
    Place,
    current_shell,
    default_location,
    detect_platform,
    notebook_identity,
    slug,
)


def stand_in(module: str, name: str, **user_ns: object) -> object:
    """An object whose class looks like ``module.name``, with a user namespace."""
    cls = type(name, (), {"__module__": module})
    shell = cls()
    shell.user_ns = dict(user_ns)
    return shell


def colab_shell(**ns: object) -> object:
    return stand_in("google.colab._shell", "Shell", **ns)


def kernel_shell(**ns: object) -> object:
    return stand_in("ipykernel.zmqshell", "ZMQInteractiveShell", **ns)


def terminal_shell(**ns: object) -> object:
    return stand_in("IPython.terminal.interactiveshell", "TerminalInteractiveShell", **ns)


COLAB_ENV = {"COLAB_RELEASE_TAG": "release-colab_20250101", "COLAB_GPU": "1"}
KAGGLE_ENV = {"KAGGLE_KERNEL_RUN_TYPE": "Interactive", **COLAB_ENV}  # Kaggle's image sets both


# ---------------------------------------------------------------- platform


@pytest.mark.parametrize(
    ("environ", "shell", "expected"),
    [
        (KAGGLE_ENV, colab_shell(), "kaggle"),
        (KAGGLE_ENV, None, "kaggle"),
        ({}, colab_shell(), "colab"),
        (COLAB_ENV, None, "colab"),  # a script started from a Colab cell
        (COLAB_ENV, kernel_shell(), "jupyter"),  # the shell says more than the environment
        ({}, kernel_shell(__vsc_ipynb_file__="/w/train.ipynb"), "vscode"),
        ({"VSCODE_PID": "42"}, kernel_shell(), "vscode"),
        ({"VSCODE_PID": "42"}, terminal_shell(), "ipython"),  # IPython in VS Code's terminal
        ({}, kernel_shell(), "jupyter"),
        ({}, terminal_shell(), "ipython"),
        ({}, None, "script"),
    ],
)
def test_detect_platform(environ, shell, expected):
    assert detect_platform(environ, shell) == expected


def test_a_shell_recognised_by_its_str_alone():
    class Anything:
        def __str__(self):
            return "<google.colab._shell.Shell object at 0x7f>"

    assert detect_platform({}, Anything()) == "colab"


def test_auto_uses_the_running_shell_without_importing_ipython(monkeypatch):
    fake = types.ModuleType("IPython")
    fake.get_ipython = lambda: kernel_shell()
    monkeypatch.setitem(__import__("sys").modules, "IPython", fake)
    assert detect_platform({}, AUTO) == "jupyter"
    assert detect_platform({}) == "jupyter"
    fake.get_ipython = lambda: None
    assert current_shell() is None and detect_platform({}) == "script"
    monkeypatch.delitem(__import__("sys").modules, "IPython")
    assert current_shell() is None and detect_platform({}) == "script"


# ---------------------------------------------------------------- identity


def test_identity_from_jupyter_session_name():
    ident = notebook_identity(kernel_shell(), {"JPY_SESSION_NAME": "/home/ana/work/My Training 2.ipynb"})
    assert ident == NotebookIdentity("My-Training-2", "/home/ana/work/My Training 2.ipynb", "JPY_SESSION_NAME")


def test_identity_from_vscode():
    shell = kernel_shell(__vsc_ipynb_file__="/w/exp/run.ipynb")
    assert notebook_identity(shell, {"VSCODE_PID": "1"}) == NotebookIdentity("run", "/w/exp/run.ipynb", "vscode")


def test_jupyter_session_name_comes_before_vscode():
    shell = kernel_shell(__vsc_ipynb_file__="/local/a.ipynb")
    assert notebook_identity(shell, {"JPY_SESSION_NAME": "/server/b.ipynb"}).name == "b"


class _Sessions(http.server.BaseHTTPRequestHandler):
    reply: object = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        body = json.dumps(self.reply).encode()
        self.send_response(200 if self.path == "/api/sessions" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def colab_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sessions)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield {"COLAB_JUPYTER_IP": "127.0.0.1", "KMP_TARGET_PORT": str(server.server_address[1])}
    server.shutdown()
    server.server_close()


def test_identity_on_colab_from_the_vms_session_list(colab_server):
    _Sessions.reply = [{"name": "Fine%20tune%20%C3%A9t%C3%A9.ipynb", "path": "fileId=1AbC"}]
    ident = notebook_identity(colab_shell(), {**COLAB_ENV, **colab_server})
    assert ident == NotebookIdentity("Fine-tune-ete", None, "colab")


def test_identity_on_colab_falls_back_when_the_session_list_is_unclear(colab_server):
    _Sessions.reply = [{"name": "a.ipynb"}, {"name": "b.ipynb"}]
    assert notebook_identity(colab_shell(), {**COLAB_ENV, **colab_server}).source == "default"
    _Sessions.reply = {"unexpected": True}
    assert notebook_identity(colab_shell(), {**COLAB_ENV, **colab_server}).source == "default"


def test_identity_on_colab_without_a_server_is_the_default_name():
    closed = {"COLAB_JUPYTER_IP": "127.0.0.1", "KMP_TARGET_PORT": "1"}  # nothing listens there
    ident = notebook_identity(colab_shell(), {**COLAB_ENV, **closed}, timeout=0.5)
    assert ident == NotebookIdentity("notebook", None, "default")
    assert notebook_identity(colab_shell(), COLAB_ENV) == ident  # no address: no request at all


def test_identity_of_a_script_and_the_stable_fallback():
    ident = notebook_identity(None, {}, argv=["/home/ana/train_resnet.py", "--epochs", "3"])
    assert ident == NotebookIdentity("train_resnet", "/home/ana/train_resnet.py", "script")
    assert notebook_identity(None, {}, argv=["-c"]).name == "notebook"
    again = [notebook_identity(kernel_shell(), {}) for _ in range(2)]
    assert again[0] == again[1] == NotebookIdentity("notebook", None, "default")


# ---------------------------------------------------------------- slug


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Untitled 1.ipynb", "Untitled-1"),
        ("/a/b/train.IPYNB", "train"),
        ("C:\\Users\\ana\\exp (v2).ipynb", "exp-v2"),
        ("résumé  draft.ipynb", "resume-draft"),
        ("..hidden.ipynb", "hidden"),
        ("a/b/", "notebook"),
        ("", "notebook"),
        ("日本語.ipynb", "notebook"),
        ("my.model_v1-final.ipynb", "my.model_v1-final"),
    ],
)
def test_slug_rules(text, expected):
    assert slug(text) == expected


def test_long_slugs_are_cut_but_stay_distinct():
    a, b = slug("x" * 120 + "a.ipynb"), slug("x" * 120 + "b.ipynb")
    assert len(a) == len(b) == 80 and a != b
    assert all(c.isalnum() or c in "._-" for c in a)


# ---------------------------------------------------------------- default location

NB = NotebookIdentity("train", None, "default")


def test_nbguard_dir_wins_everywhere_and_is_not_appended(tmp_path):
    for platform in ("colab", "kaggle", "jupyter", "vscode", "ipython", "script"):
        place = default_location(platform, NB, {"NBGUARD_DIR": "/data/runs/exp1"}, cwd=str(tmp_path),
                                 root=str(tmp_path))
        assert place.path == "/data/runs/exp1" and place.platform == platform
        assert place.why.startswith("set by NBGUARD_DIR")
    relative = default_location("jupyter", NB, {"NBGUARD_DIR": "ckpt"}, cwd="/w/proj")
    assert relative.path == "/w/proj/ckpt" and relative.survives_disconnect
    home = default_location("script", NB, {"NBGUARD_DIR": "~/ckpt", "HOME": "/home/ana"}, cwd="/w")
    assert home.path == os.path.expanduser("~/ckpt")


def test_colab_with_drive_mounted(tmp_path):
    (tmp_path / "content" / "drive" / "MyDrive").mkdir(parents=True)
    place = default_location("colab", NB, {}, root=str(tmp_path))
    assert place == Place(str(tmp_path / "content/drive/MyDrive/nbguard/train"), "colab", True,
                          "in your Google Drive", None)
    assert default_location("colab", NB, {"NBGUARD_DIR": str(tmp_path / "content/drive/MyDrive/x")},
                            root=str(tmp_path)).survives_disconnect


def test_colab_without_drive_warns_and_says_how_to_fix(tmp_path):
    place = default_location("colab", NB, {}, root=str(tmp_path))
    assert place.path == str(tmp_path / "content/nbguard-snapshots/train")
    assert not place.survives_disconnect
    assert "lost when Colab recycles the VM" in place.why
    assert "disconnect loses" in place.warning
    assert "drive.mount('/content/drive')" in place.warning and "%nbguard drive" in place.warning
    assert place.warning in place.message()
    assert not default_location("colab", NB, {"NBGUARD_DIR": "/content/ckpt"}, root="/").survives_disconnect


def test_kaggle(tmp_path):
    place = default_location("kaggle", NB, KAGGLE_ENV, root=str(tmp_path))
    assert place.path == str(tmp_path / "kaggle/working/nbguard-snapshots/train")
    assert not place.survives_disconnect
    assert "saved version" in place.warning and "%nbguard drive" in place.warning
    batch = default_location("kaggle", NB, {"KAGGLE_KERNEL_RUN_TYPE": "Batch"}, root=str(tmp_path))
    assert batch.survives_disconnect and batch.warning is None


def test_local_notebooks_keep_snapshots_next_to_the_notebook(tmp_path):
    ident = NotebookIdentity("run", "/w/exp/run.ipynb", "vscode")
    for platform in ("jupyter", "vscode"):
        place = default_location(platform, ident, {}, cwd=str(tmp_path))
        assert place.path == "/w/exp/nbguard-snapshots/run" and place.survives_disconnect and place.warning is None
    relative = NotebookIdentity("run", "exp/run.ipynb", "JPY_SESSION_NAME")  # an API path: use the cwd
    assert default_location("jupyter", relative, {}, cwd="/w/exp").path == "/w/exp/nbguard-snapshots/run"
    assert default_location("jupyter", NB, {}, cwd="/w").path == "/w/nbguard-snapshots/train"


def test_scripts_and_terminals_use_the_current_folder():
    ident = NotebookIdentity("train_resnet", "/elsewhere/train_resnet.py", "script")
    for platform in ("script", "ipython"):
        place = default_location(platform, ident, {}, cwd="/w")
        assert place.path == "/w/nbguard-snapshots/train_resnet" and place.why == "in the current folder"


def test_message_is_one_line_without_a_warning():
    place = default_location("script", NB, {}, cwd="/w")
    assert place.message() == "nbguard: snapshots go to /w/nbguard-snapshots/train (in the current folder)."


@pytest.mark.e2e
def test_inside_a_real_jupyter_kernel(tmp_path):
    jupyter_client = pytest.importorskip("jupyter_client")
    km = jupyter_client.KernelManager(kernel_name="python3")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAGGLE_", "COLAB_", "VSCODE_"))}
    km.start_kernel(env={**env, "JPY_SESSION_NAME": str(tmp_path / "My Nb.ipynb")}, cwd=str(tmp_path))
    kc = km.client()
    out: list[dict] = []
    try:
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        code = (f"import sys; sys.path.insert(0, {repo!r})\n"
                "from nbguard.stores.place import detect_platform, notebook_identity, default_location\n"
                "p = detect_platform(); i = notebook_identity(); print(p, i.name, default_location(p, i).path)")
        reply = kc.execute_interactive(code, timeout=60, output_hook=out.append)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert reply["content"]["status"] == "ok"
    text = "".join(m["content"].get("text", "") for m in out if m["msg_type"] == "stream")
    assert text.split() == ["jupyter", "My-Nb", str(tmp_path / "nbguard-snapshots" / "My-Nb")]


def test_name_from_the_training_cell_survives_edits_of_bounds_and_prints():
    from nbguard.stores.place import name_from_cell

    cell = "for epoch in range(5):\n    for x, y in loader:\n        step(x, y)\n"
    edited = "lr = 3e-4\nfor epoch in range(8):\n    print(epoch)\n    for x, y in loader:\n        step(x, y)\n"
    other = "for epoch in range(5):\n    for x, y in train_loader:\n        step(x, y)\n"
    assert name_from_cell(cell) == name_from_cell(edited) != name_from_cell(other)
    assert name_from_cell(cell).startswith("cell-")


@pytest.mark.parametrize(("path", "typo"), [("/content/drvie/MyDrive/runs", "'drvie' instead of 'drive'"),
                                            ("/content/drive/Mydrive/runs", "'Mydrive' instead of 'MyDrive'"),
                                            ("/content/drive/MyDrive/runs", None), ("/content/runs", None),
                                            ("/home/me/drvie", None)])
def test_a_mistyped_drive_path_is_recognised(path, typo):
    from nbguard.stores.place import judge_location, mistyped_drive

    assert mistyped_drive(path) == typo
    place = judge_location(path, "colab", {})
    assert (place.warning is not None and "mistyped Google Drive path" in place.warning) == (typo is not None)
    if path.startswith("/content/drive/MyDrive"):
        assert place.survives_disconnect and place.why == "in your Google Drive"
    elif typo:
        assert not place.survives_disconnect and "lost when Colab recycles the VM" in place.why
