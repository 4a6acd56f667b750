"""Where are we (Colab, Kaggle, VS Code, Jupyter, a terminal, a script), which notebook is this,
and where do its snapshots go by default.

Every probe is injectable (``environ``, ``shell``, ``argv``, ``root``), so each place can be
simulated in tests. IPython is never imported here: a shell is found only if IPython is already
loaded (``current_shell``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import unicodedata
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

PLATFORMS = ("kaggle", "colab", "vscode", "jupyter", "ipython", "script")
AUTO: object = type("Auto", (), {"__repr__": lambda self: "AUTO"})()
"""Default for ``shell``: use the running IPython shell if there is one. Pass None for "no shell"."""

DRIVE = "/content/drive/MyDrive"
# Not "nbguard": a folder of that name in the working directory (which is on sys.path in a kernel)
# would shadow the package itself for editable installs.
FOLDER = "nbguard-snapshots"
_SLUG_MAX = 80
_MOUNT_DRIVE = "from google.colab import drive; drive.mount('/content/drive')"


@dataclass(frozen=True)
class NotebookIdentity:
    """Which notebook this is: ``name`` (a slug safe for folder names), ``path`` (str or None),
    and ``source``, how it was found ('JPY_SESSION_NAME', 'vscode', 'colab', 'script', 'default')."""

    name: str
    path: str | None
    source: str


@dataclass(frozen=True)
class Place:
    """A default folder for snapshots, and what the user should know about it."""

    path: str
    platform: str
    survives_disconnect: bool
    why: str
    warning: str | None = None

    def message(self) -> str:
        """The line shown to the user once: where, why, and the warning if there is one."""
        line = f"nbguard: snapshots go to {self.path} ({self.why})."
        return f"{line}\n{self.warning}" if self.warning else line


def current_shell() -> object | None:
    """The running IPython shell, or None; never imports IPython."""
    ipython = sys.modules.get("IPython")
    try:
        return ipython.get_ipython() if ipython is not None else None
    except Exception:
        return None


def _shell(shell: object) -> object | None:
    return current_shell() if shell is AUTO else shell


def _shell_text(shell: object) -> str:
    """The shell's class path (and its bases') plus its str(): enough to tell the kinds apart."""
    names = [f"{c.__module__}.{c.__qualname__}" for c in type(shell).__mro__]
    try:
        names.append(str(shell))
    except Exception:
        pass
    return " ".join(names)


def _user_ns(shell: object) -> Mapping[str, object]:
    ns = getattr(shell, "user_ns", None)
    return ns if isinstance(ns, Mapping) else {}


def detect_platform(environ: Mapping[str, str] = os.environ, shell: object = AUTO) -> str:
    """'kaggle', 'colab', 'vscode', 'jupyter', 'ipython' or 'script'.

    Kaggle first (``KAGGLE_KERNEL_RUN_TYPE``): Kaggle's image also sets Colab's variables. Colab:
    the shell is google.colab's; with no shell (a script started from a Colab cell) the
    ``COLAB_RELEASE_TAG``/``COLAB_GPU`` variables. VS Code: its ``__vsc_ipynb_file__`` global, or
    ``VSCODE_PID`` with a kernel shell. Jupyter: an ipykernel shell (ZMQInteractiveShell). Any
    other shell: 'ipython'. No shell: 'script'. ``shell=AUTO`` looks for a running IPython.
    """
    shell = _shell(shell)
    if "KAGGLE_KERNEL_RUN_TYPE" in environ:
        return "kaggle"
    if shell is None:
        return "colab" if ("COLAB_RELEASE_TAG" in environ or "COLAB_GPU" in environ) else "script"
    text = _shell_text(shell)
    if "google.colab" in text:
        return "colab"
    kernel = "ZMQInteractiveShell" in text
    if "__vsc_ipynb_file__" in _user_ns(shell) or (kernel and "VSCODE_PID" in environ):
        return "vscode"
    return "jupyter" if kernel else "ipython"


def slug(text: str) -> str:
    """A folder name from a notebook name: [A-Za-z0-9._-], spaces to '-', no '.ipynb', at most 80
    characters (a long name keeps a short hash of the whole so that two names do not collide)."""
    base = re.split(r"[\\/]", text.strip())[-1]
    base = re.sub(r"\.(ipynb|py)$", "", base, flags=re.IGNORECASE)
    base = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode()
    base = re.sub(r"\s+", "-", base)
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", base)
    base = re.sub(r"-{2,}", "-", base).strip("-.")
    if len(base) > _SLUG_MAX:
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        base = base[: _SLUG_MAX - 9].rstrip("-.") + "-" + digest
    return base or "notebook"


def _colab_session_name(environ: Mapping[str, str], timeout: float) -> str | None:
    """The notebook's name from the Colab VM's own Jupyter server (never leaves the VM)."""
    host, port = environ.get("COLAB_JUPYTER_IP"), environ.get("KMP_TARGET_PORT")
    if not host or not port:
        return None
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/api/sessions", timeout=timeout) as reply:
            sessions = json.load(reply)
        name = sessions[0]["name"] if len(sessions) == 1 else None
    except Exception:  # no server, a timeout, an unexpected reply: fall back to the default name
        return None
    return urllib.parse.unquote(name) if isinstance(name, str) and name.strip() else None


def notebook_identity(shell: object = AUTO, environ: Mapping[str, str] = os.environ, *,
                      argv: Sequence[str] | None = None, timeout: float = 1.0) -> NotebookIdentity:
    """Which notebook (or script) this is, stable across kernel restarts.

    In order: ``JPY_SESSION_NAME`` (set by jupyter_server for a notebook's kernel: its path);
    VS Code's ``__vsc_ipynb_file__``; on Colab, the session list of the VM's Jupyter server
    (``COLAB_JUPYTER_IP``:``KMP_TARGET_PORT``, ``timeout`` seconds); for a script, the stem of
    ``sys.argv[0]``; else 'notebook'. Never the kernel id or the pid.
    """
    shell = _shell(shell)
    session = environ.get("JPY_SESSION_NAME", "").strip()
    if session:
        return NotebookIdentity(slug(session), session, "JPY_SESSION_NAME")
    vsc = _user_ns(shell).get("__vsc_ipynb_file__") if shell is not None else None
    if isinstance(vsc, str) and vsc.strip():
        return NotebookIdentity(slug(vsc), vsc, "vscode")
    platform = detect_platform(environ, shell)
    if platform == "colab" and (name := _colab_session_name(environ, timeout)):
        return NotebookIdentity(slug(name), None, "colab")
    if platform == "script":
        script = (sys.argv if argv is None else argv)[:1]
        if script and script[0] not in ("", "-c", "-"):
            return NotebookIdentity(slug(script[0]), os.path.abspath(script[0]), "script")
    return NotebookIdentity("notebook", None, "default")


def default_location(platform: str, identity: NotebookIdentity, environ: Mapping[str, str] = os.environ,
                     cwd: str | None = None, *, root: str = "/") -> Place:
    """Where this notebook's snapshots go unless the user says otherwise.

    * ``NBGUARD_DIR`` set: that folder exactly (the notebook's name is not appended: the user
      chose the folder); a relative path is taken from ``cwd``.
    * Colab with Drive mounted (``/content/drive/MyDrive`` exists): ``MyDrive/nbguard/<name>``.
    * Colab without: ``/content/nbguard-snapshots/<name>``, lost on disconnect, with a warning saying so.
    * Kaggle: ``/kaggle/working/nbguard-snapshots/<name>``, kept only with a saved version or Files
      persistence, with a warning saying so.
    * Jupyter, VS Code: ``nbguard-snapshots/<name>`` in the notebook's folder when its absolute path is
      known, else in ``cwd`` (a kernel starts in its notebook's folder).
    * IPython, a script: ``nbguard-snapshots/<name>`` in ``cwd``.

    ``root`` prefixes the fixed Colab and Kaggle paths (tests point it at a tmp folder).
    """
    cwd = cwd or os.getcwd()
    chosen = environ.get("NBGUARD_DIR", "").strip()
    if chosen:
        path = os.path.normpath(os.path.join(cwd, os.path.expanduser(chosen)))
        return _judge(platform, path, "set by NBGUARD_DIR", root, environ)
    if platform == "colab":
        drive = os.path.join(root, DRIVE.lstrip("/"))
        if os.path.isdir(drive):
            return _judge(platform, os.path.join(drive, "nbguard", identity.name), "", root, environ)
        return _judge(platform, os.path.join(root, "content", FOLDER, identity.name), "", root, environ)
    if platform == "kaggle":
        path = os.path.join(root, "kaggle", "working", FOLDER, identity.name)
        return _judge(platform, path, "", root, environ)
    folder, where = cwd, "in the current folder"
    if platform in ("jupyter", "vscode") and identity.path and os.path.isabs(identity.path):
        folder, where = os.path.dirname(identity.path), "next to the notebook"
    return Place(os.path.join(folder, FOLDER, identity.name), platform, True, where)


def _judge(platform: str, path: str, why: str, root: str, environ: Mapping[str, str]) -> Place:
    """How long a folder lasts on this platform, and what to tell the user about it."""
    if platform == "colab":
        mount = os.path.join(root, "content", "drive")
        if os.path.commonpath([path, mount]) == mount:
            return Place(path, platform, True, why or "in your Google Drive")
        return Place(path, platform, False, why or "on this machine's disk: lost when Colab recycles the VM",
                     f"A Colab disconnect loses the snapshots in {path}. To keep them, mount Google Drive "
                     f"before training ({_MOUNT_DRIVE}), or run %nbguard drive.")
    if platform == "kaggle":
        if environ.get("KAGGLE_KERNEL_RUN_TYPE", "").lower() == "batch":
            return Place(path, platform, True, why or "in /kaggle/working: saved with this version's output")
        return Place(path, platform, False, why or "in /kaggle/working: kept only in a saved version",
                     f"Kaggle keeps {path} after the session ends only in a saved version (Save Version) or "
                     "with Persistence set to Files in the notebook's session options. To keep snapshots "
                     "in Google Drive instead, run %nbguard drive.")
    return Place(path, platform, True, why or "on this machine's disk")


# The one process-wide setting of this module: the folder the loaded extension chose for this
# kernel (``%nbguard drive`` and ``%nbguard config dir=...`` change it). The session registers it,
# so that this module never imports the layers above it.
_kernel_folder: Callable[[], str] | None = None


def use_kernel_folder(folder: Callable[[], str] | None) -> None:
    """Make ``default_dir()`` answer ``folder()`` (None: back to the place's default)."""
    global _kernel_folder
    _kernel_folder = folder


def default_dir() -> str:
    """Where this notebook's snapshots go: the loaded extension's folder (which ``%nbguard drive`` or
    ``%nbguard config dir=...`` may have changed), else the default for this place."""
    if _kernel_folder is not None:
        return _kernel_folder()
    return default_location(detect_platform(), notebook_identity()).path


def judge_location(location: str, platform: str, environ: Mapping[str, str] = os.environ, *,
                   root: str = "/") -> Place:
    """What to tell the user about a folder (or URL) they chose with ``--dir``: whether it survives
    a disconnect here, and a warning when it looks like a mistyped Google Drive path."""
    if "://" in location:
        scheme = location.split("://", 1)[0]
        if scheme == "gdrive":
            return Place(location, platform, True, "in Google Drive through its API: saved on this machine first, "
                                                    "then uploaded and verified")
        if scheme == "memory":
            return Place(location, platform, False, "in this kernel's memory: gone when the kernel stops")
        return Place(location, platform, True, f"in the {scheme} store")
    path = os.path.abspath(os.path.expanduser(location))
    place = _judge(platform, path, "", root, environ)
    typo = mistyped_drive(path)
    if typo:
        warning = f"{path} looks like a mistyped Google Drive path ({typo}): these folders are created on this " \
                  "machine's temporary disk. Check the spelling, e.g. /content/drive/MyDrive/…"
        if platform == "colab":  # not in the Drive mount (or refused by it): the VM's own disk
            return Place(place.path, platform, False, "on this machine's disk: lost when Colab recycles the VM", warning)
        return Place(place.path, place.platform, place.survives_disconnect, place.why, warning)
    return place


def mistyped_drive(path: str) -> str | None:
    """'did you mean …' when ``path`` is close to, but not inside, Colab's Drive mount."""
    import difflib

    parts = os.path.normpath(path).split(os.sep)
    if len(parts) < 3 or parts[1] != "content":
        return None

    def near(word: str, target: str) -> bool:
        return word != target and difflib.SequenceMatcher(None, word.lower(), target.lower()).ratio() >= 0.7

    if near(parts[2], "drive"):
        return f"'{parts[2]}' instead of 'drive'"
    if parts[2] == "drive" and len(parts) > 3 and parts[3] not in ("MyDrive", "My Drive", "Shareddrives",
                                                                   "Othercomputers", ".shortcut-targets-by-id"):
        if near(parts[3], "MyDrive"):
            return f"'{parts[3]}' instead of 'MyDrive'"
    return None


def name_from_cell(source: str) -> str:
    """A stable folder name for a notebook whose kernel does not say which notebook it runs: from
    the names its guarded cell's loops use (``epoch``, ``range``, ``loader``...), which stay the same
    when bounds, hyperparameters or prints are edited."""
    import ast

    try:
        tree = ast.parse(source)
    except SyntaxError:
        tree = None
    names: set[str] = set()
    for node in ast.walk(tree) if tree is not None else ():
        if isinstance(node, (ast.For, ast.While)):
            parts = [node.target, node.iter] if isinstance(node, ast.For) else [node.test]
            names.update(n.id for part in parts for n in ast.walk(part) if isinstance(n, ast.Name))
    key = " ".join(sorted(names)) or source.strip()
    return f"cell-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
