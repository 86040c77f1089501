"""``make demo`` runs as shipped and cleans up; the wheel installs into a clean venv and works."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.real
def test_demo_shows_copies_and_links_and_leaves_nothing_behind() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "demo" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Bcc: dave@customer.example" in out
    assert re.search(r"contact:c-101 \(Dave Director\)\s+dave@customer\.example\s+bcc", out)
    assert re.search(r"lead:l-200 \(Carol Prospect\)\s+carol@prospect\.example\s+to", out)
    links = [line for line in out.splitlines() if " sent " in line and "address" in line]
    assert len(links) == 3  # the private message is not linked
    assert not any("[private]" in line for line in links)
    root = re.search(r"removed (\S+)", out)
    assert root is not None and not Path(root.group(1)).exists()
    leftovers = subprocess.run(
        ["pgrep", "-f", root.group(1)], capture_output=True, text=True, check=False
    )
    assert leftovers.stdout == "", "processes of the demo still run"


@pytest.mark.real
def test_wheel_installs_into_a_clean_venv_with_command_and_man_pages(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(REPO)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    [wheel] = dist.glob("sentlink-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stderr
    version = subprocess.run(
        [str(venv / "bin" / "sentlink"), "--version"], capture_output=True, text=True, timeout=60
    )
    assert version.returncode == 0 and "sentlink" in version.stdout
    check = subprocess.run(
        [str(venv / "bin" / "sentlink"), "-c", str(REPO / "config/sentlink.yaml"), "check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert check.returncode == 0, check.stderr
    assert (venv / "share/man/man8/sentlink.8").is_file()
    assert (venv / "share/man/man5/sentlink.yaml.5").is_file()
    # The milter's C extension built and imports (libmilter-dev, gcc, Python headers).
    subprocess.run([str(venv / "bin" / "python"), "-c", "import milter, Milter"], check=True)
