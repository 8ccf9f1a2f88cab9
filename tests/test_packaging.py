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


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


@pytest.mark.parametrize("present, installed", [
    ({"chromium"}, "libportaudio2"),
    ({"portaudio"}, "chromium"),
    (set(), "chromium libportaudio2"),
    ({"chromium", "portaudio"}, None),
])
def test_install_test_gets_each_system_package_on_its_own(tmp_path, present, installed):
    """`install.sh --test` as root apt-installs exactly the system packages that are missing:
    Chromium being there does not skip PortAudio, nor the other way round."""
    import shutil
    bin_dir, log = tmp_path / "bin", tmp_path / "apt.log"
    bin_dir.mkdir()
    (bin_dir / "dirname").symlink_to(shutil.which("dirname"))
    _stub(bin_dir, "python", "exit 0")  # torch "is there", pip installs nothing
    _stub(bin_dir, "id", "echo 0")
    _stub(bin_dir, "apt-get", f'echo "$*" >> {log}')
    _stub(bin_dir, "dpkg-query", "exit 1")
    _stub(bin_dir, "ldconfig", "echo '\tlibportaudio.so.2 (libc6,x86-64) => /usr/lib/libportaudio.so.2'"
          if "portaudio" in present else "exit 0")
    if "chromium" in present:
        _stub(bin_dir, "chromium", "exit 0")
    run = subprocess.run([shutil.which("bash"), str(ROOT / "scripts" / "install.sh"), "--test"],
                         capture_output=True, text=True, timeout=60,
                         env={"PATH": str(bin_dir), "PYTHON": str(bin_dir / "python")})
    assert run.returncode == 0, run.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    if installed is None:
        assert calls == []
    else:
        assert calls == ["update -qq", f"install -y -qq {installed}"]
