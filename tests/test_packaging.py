"""The package as a wheel: the page ships inside it, and a server run from the
unpacked wheel, outside the checkout, serves it."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_carries_the_page_and_serves_it(tmp_path):
    """`pip wheel .` holds voice/web/; imported from the unpacked wheel, the server finds its page there."""
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel, = (tmp_path / "dist").glob("voice-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"voice/web/index.html", "voice/web/app.js", "voice/web/mic-worklet.js"} <= names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("import voice.server as s; d = s.default_web_dir(); files = s._load_web(d); "
             "print(s.__file__); print(d); print(sorted(files))")
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-2000:]
    module, web, files = run.stdout.splitlines()
    assert module.startswith(str(site)) and web == str(site / "voice" / "web")
    assert "'index.html'" in files and "'app.js'" in files
