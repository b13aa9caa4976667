"""The code measured: a snapshot of multifd_cli/ started the way an installed wheel
starts, so that edits made during a run and the editable install do not show in it.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from harness import REPO
from harness.procs import CHILD


def use_snapshot(root: Path) -> str:
    """Run multifd from a copy of multifd_cli/ taken now; return a digest of its sources.

    Others edit multifd_cli/ while benchmarks run: without a snapshot one run could mix
    versions. Children get PYTHONPATH=root and cwd=root (`python -m` puts the cwd first
    on sys.path); MULTIFD_* variables are removed from their environment so that the
    defaults measured are the real defaults.
    """
    pkg = root / "multifd_cli"
    shutil.copytree(REPO / "multifd_cli", pkg,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    h = hashlib.sha256()
    for f in sorted(pkg.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    CHILD.env["PYTHONPATH"] = str(root)
    # An installed package has its bytecode compiled at install time; without
    # this, PYTHONDONTWRITEBYTECODE (set in some shells) made every start of
    # multifd compile its ~40 modules from source (~40 ms).
    CHILD.env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(pkg)], check=True)
    CHILD.cwd = root
    _user_install(root / "venv")
    return h.hexdigest()[:12]


def _user_install(venv: Path) -> None:
    """Run children the way a `pip install multifd-cli` user would start them.

    The development venv is an editable install, whose import hook costs every
    start ~12 ms (it pulls in pathlib and importlib.util) that an installed wheel
    does not. This venv has no pip and no packages of its own: a .pth line puts
    our site-packages on its path as a plain directory, so the dependencies
    import from there while that directory's own .pth files (the hook) are not run.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    out = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    deps = [p for p in sys.path if p.endswith("site-packages")]
    Path(out.stdout.strip(), "deps.pth").write_text("".join(f"{p}\n" for p in deps))
    CHILD.multifd = [str(py), "-m", "multifd_cli"]
