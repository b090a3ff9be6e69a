"""A request the CLI refuses is refused before torch (or any model) is imported: at once, whatever the machine."""

import subprocess
import sys

import pytest

CHECK = """
import sys
from sdtorch.cli import main
try:
    code = main({argv!r})
except SystemExit as e:  # argparse's own errors exit
    code = e.code
assert code == 2, code
heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
assert not heavy, heavy
"""


@pytest.mark.parametrize("argv", [
    ["generate", "x", "--steps", "1000"],
    ["generate", "x", "--width", "4096"],
    ["generate", "x", "--width", "2048", "--height", "2048", "--batch", "2"],
    ["generate", "x", "--cfg", "nan"],
    ["generate", "x", "--stpes", "3"],
    ["serve", "--api-auth", "no-password"],
    ["serve", "--limit", "max_steps=0"],
])
def test_refusals_import_no_torch(argv):
    done = subprocess.run([sys.executable, "-c", CHECK.format(argv=argv)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sdtorch: error:" in done.stderr and "Traceback" not in done.stderr
