"""The committed circuit.json and tests/fixtures/ are reproduced byte for byte by tools/noir/fixtures.mjs."""
import os
import shutil
import subprocess

import pytest

from support import CIRCUIT, FIXTURES, ROOT

NOIR_TOOLS = os.path.join(ROOT, "tools", "noir")


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    """Run fixtures.mjs into a temp root (after `npm ci` if node_modules is missing); return that root."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed: cannot regenerate the Noir fixtures")
    if not os.path.isdir(os.path.join(NOIR_TOOLS, "node_modules")):
        npm = shutil.which("npm")
        assert npm, "node is installed but npm is not: npm is needed for `npm ci` in tools/noir"
        proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--silent"], cwd=NOIR_TOOLS,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"npm ci in tools/noir failed:\n{proc.stdout}\n{proc.stderr}"
    out = tmp_path_factory.mktemp("fixtures-root")
    proc = subprocess.run(["node", os.path.join(NOIR_TOOLS, "fixtures.mjs"), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"fixtures.mjs failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def test_circuit_json_is_reproduced(regenerated):
    with open(CIRCUIT, "rb") as f:
        assert (regenerated / "circuit.json").read_bytes() == f.read()


def test_every_fixture_is_reproduced_and_none_is_stale(regenerated):
    produced = sorted(os.listdir(regenerated / "tests" / "fixtures"))
    assert produced == sorted(os.listdir(FIXTURES))
    different = []
    for name in produced:
        with open(os.path.join(FIXTURES, name), "rb") as f:
            if (regenerated / "tests" / "fixtures" / name).read_bytes() != f.read():
                different.append(name)
    assert different == [], f"committed fixtures that fixtures.mjs no longer produces: {different}"

