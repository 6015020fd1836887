"""Fixtures of the prover layer's tests: bb runs counted, a tiny disk, the benchmark circuits' VKs."""
import os
import subprocess
from collections import namedtuple

import pytest

from bbworker.bbrunner import bb as bb_module
from support import ROOT, tmpfs

HASHCHAIN = os.path.join(ROOT, "bench", "fixtures")
Hashchain = namedtuple("Hashchain", "circuit witness vk")  # paths of a benchmark circuit, its witness, its VK


@pytest.fixture
def count_runs(monkeypatch):
    """Wrap the process.run that BB.run calls; returns the list of argv[1] of every bb run since."""
    seen = []
    real = bb_module.run

    def run(argv, timeout, *args, **kwargs):
        seen.append(argv[1])
        return real(argv, timeout, *args, **kwargs)
    monkeypatch.setattr(bb_module, "run", run)
    return seen


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 16 KiB tmpfs (root only): room for bb's public inputs, not for a 14656-byte proof."""
    with tmpfs(tmp_path / "tmpfs", "16k") as mount:
        yield mount


@pytest.fixture(scope="session")
def hashchains(bb, crs_dir, tmp_path_factory):
    """{n: Hashchain} of the committed benchmark circuits hashchain-n (2^10..2^13 rows), VKs by the real bb."""
    out = {}
    for n in (7, 15, 31, 62):
        circuit = os.path.join(HASHCHAIN, f"hashchain-{n}", "circuit.json")
        d = tmp_path_factory.mktemp(f"vk{n}")
        proc = subprocess.run([bb, "write_vk", "-b", circuit, "-o", str(d), "-c", crs_dir],
                              capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        out[n] = Hashchain(circuit, os.path.join(HASHCHAIN, f"hashchain-{n}", "witness.gz"), str(d / "vk"))
    return out
