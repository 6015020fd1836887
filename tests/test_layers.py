"""The package's shape: layers import downward only, and importing any module starts and writes nothing."""
import ast
import json
import os
import subprocess
import sys

import pytest

from support import CIRCUIT, ROOT

PACKAGE = os.path.join(ROOT, "bbworker")
# Each layer and what it may import from the package (itself included); the base modules import nothing of ours.
BASE = {"bbworker", "bbworker.errors", "bbworker.settings", "bbworker.files"}
LAYERS = {
    "bbworker.bbrunner": BASE | {"bbworker.bbrunner"},
    "bbworker.server": BASE | {"bbworker.bbrunner", "bbworker.server"},
    "bbworker.web": BASE | {"bbworker.bbrunner", "bbworker.server", "bbworker.web"},
}


def modules():
    """Every module of the package: {dotted name: path}."""
    found = {}
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def imported(path):
    """The bbworker modules that the file at `path` imports (set of dotted names)."""
    names = set()
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {n for n in names if n == "bbworker" or n.startswith("bbworker.")}


def allowed(importer, target):
    if importer in BASE and importer != "bbworker":
        return False  # the base modules import nothing of the package
    for layer, may in LAYERS.items():
        if importer == layer or importer.startswith(layer + "."):
            return any(target == m or target.startswith(m + ".") for m in may)
    return True  # bbworker/__init__.py


@pytest.mark.parametrize("module", sorted(modules()))
def test_layers_import_downward_only(module):
    wrong = sorted(t for t in imported(modules()[module]) if not allowed(module, t))
    assert not wrong, f"{module} imports {wrong}: layers go web -> server -> bbrunner -> errors/settings/files"


def test_every_module_is_in_a_layer_or_the_base():
    for module in modules():
        assert module in BASE or any(module == layer or module.startswith(layer + ".") for layer in LAYERS), module


def test_importing_every_module_starts_and_writes_nothing(tmp_path):
    """A fresh process imports every module, the entry points included, with an empty TMPDIR and a
    bb that leaves a mark when run: nothing is made, no process started."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    mark = tmp_path / "bb-ran"
    fake_bb = tmp_path / "bb"
    fake_bb.write_text(f"#!/bin/sh\ntouch {mark}\necho 5.0.0\n")
    fake_bb.chmod(0o755)
    script = (
        "import importlib, importlib.util, json, os, sys\n"
        f"for name in {sorted(modules())!r}:\n"
        "    importlib.import_module(name)\n"
        "for entry in ('app.py', 'gunicorn.conf.py'):\n"
        "    spec = importlib.util.spec_from_file_location(entry.split('.')[0] + '_entry', entry)\n"
        "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "children = open(f'/proc/self/task/{os.getpid()}/children').read().split()\n"
        "print(json.dumps({'children': children, 'tmpdir': os.listdir(os.environ['TMPDIR'])}))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PROMETHEUS_MULTIPROC_DIR", "BB_WORKER_RUN_DIR")}
    env.update(TMPDIR=str(tmpdir), BB_BINARY=str(fake_bb), CIRCUIT_PATH=CIRCUIT)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])  # before exit: atexit handlers may remove what was made
    assert seen["children"] == [], "a child process was started"
    assert seen["tmpdir"] == [] and os.listdir(tmpdir) == [], "files were made in TMPDIR"
    assert not mark.exists(), "bb was run"


def test_the_master_does_not_import_prometheus_client_before_its_hooks_run():
    """prometheus_client chooses its multiprocess mode at import, from PROMETHEUS_MULTIPROC_DIR, which
    the master's on_starting sets: a master that imported it earlier would fork workers whose metrics
    are each their own (every worker answering /api/metrics with its own counts)."""
    script = ("import importlib.util, sys\n"
              "spec = importlib.util.spec_from_file_location('conf', 'gunicorn.conf.py')\n"
              "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
              "print('prometheus_client' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "False"
