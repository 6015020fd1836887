"""Shared test fixtures: the real bb, a writable CRS, live gunicorn servers, bb verify.

Helpers (fixture files, Server, HTTP, /proc) live in support.py, shared with the benchmark.
"""
import os
import shutil
import subprocess

import pytest

from support import BB, CIRCUIT, FAKE_BB, SHARED_CRS, Server, crs_args


# ---------------------------------------------------------------- bb and the CRS

@pytest.fixture(scope="session")
def bb():
    """Path of the real bb. Fails (never skips): `make test` installs it."""
    assert os.access(BB, os.X_OK), f"bb not found at {BB}: run `make setup` (scripts/install_bb.py)"
    return BB


@pytest.fixture(scope="session")
def crs_dir(tmp_path_factory):
    """A CRS dir bb can use offline: a writable copy of ../shared/crs, else $BB_CRS_PATH, else None."""
    if os.path.exists(os.path.join(SHARED_CRS, "bn254_g1.dat")):
        target = tmp_path_factory.mktemp("crs")
        for name in ("bn254_g1.dat", "bn254_g2.dat"):
            shutil.copyfile(os.path.join(SHARED_CRS, name), target / name)
        return str(target)
    return os.environ.get("BB_CRS_PATH") or None  # None: bb's default ~/.bb-crs


@pytest.fixture(scope="session")
def reference_vk(bb, crs_dir, tmp_path_factory):
    """The demo circuit's VK, computed here with `bb write_vk` (not taken from the server)."""
    out = tmp_path_factory.mktemp("vk")
    subprocess.run([bb, "write_vk", "-b", CIRCUIT, "-o", str(out)] + crs_args(crs_dir),
                   check=True, capture_output=True, timeout=120)
    return str(out / "vk")


@pytest.fixture(scope="session")
def verify(bb, crs_dir, reference_vk, tmp_path_factory):
    """verify(proof: bytes, public_inputs: list of 0x-hex, vk=reference, extra=[]) -> bool, by `bb verify`."""
    def run(proof, public_inputs, vk=None, extra=()):
        d = tmp_path_factory.mktemp("verify")
        (d / "proof").write_bytes(proof)
        (d / "public_inputs").write_bytes(b"".join(bytes.fromhex(x[2:]) for x in public_inputs))
        proc = subprocess.run([bb, "verify", "-k", vk or reference_vk, "-p", str(d / "proof"),
                               "-i", str(d / "public_inputs")] + list(extra) + crs_args(crs_dir),
                              capture_output=True, timeout=120)
        return proc.returncode == 0
    return run


# ---------------------------------------------------------------- fake bb for fault injection

@pytest.fixture
def fake_bb(tmp_path):
    """Path of a copy of tests/programs/fakebb/bb (its docstring lists the FAKE_BB_* variables).

    A copy per test, so bb_processes(fake_bb) sees only this test's runs.
    """
    path = tmp_path / "fake-bb"
    shutil.copy(FAKE_BB, path)
    return str(path)


# ---------------------------------------------------------------- live servers

@pytest.fixture
def start_server(tmp_path, crs_dir, bb):
    """start_server(**env) -> a ready Server with the real bb and CRS unless env overrides them."""
    servers = []

    def start(ready=True, **env):
        base = {"BB_BINARY": bb}
        if crs_dir:
            base["BB_CRS_PATH"] = crs_dir
        base.update({k: str(v) for k, v in env.items()})
        server = Server(str(tmp_path / f"server{len(servers)}"), base)
        servers.append(server)
        return server.wait_ready() if ready else server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, crs_dir):
    """One real server shared by a module's tests (real bb, real CRS)."""
    assert os.access(BB, os.X_OK), f"bb not found at {BB}: run `make setup`"
    env = {"BB_BINARY": BB}
    if crs_dir:
        env["BB_CRS_PATH"] = crs_dir
    srv = Server(str(tmp_path_factory.mktemp("server")), env).wait_ready()
    yield srv
    srv.stop()


@pytest.fixture
def pair():
    """(server side, client side): a connected pair of gevent sockets."""
    from gevent import socket as gsocket
    a, b = gsocket.socketpair()
    yield a, b
    a.close()
    b.close()
