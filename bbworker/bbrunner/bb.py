"""The bb binary: whether it runs, its version, and one bb run with every server-wide option.

BB is shared by every Circuit of a server. Its status is cheap to ask (health checks ask
it on every call): `bb --version` runs only when the file changed. describe_elf() says
what the binary is, as `file` would (the image has no `file`), for /api/health's
`binary_arch`, the Rust worker's field.
"""
import os
import struct
import time
from collections import namedtuple

import gevent
from gevent.lock import Semaphore

from bbworker import files
from bbworker.bbrunner import messages
from bbworker.bbrunner.process import run
from bbworker.errors import ProverError, ProverTimeout, ProverUnavailable

VERSION_TIMEOUT_SECONDS = 30.0
VERSION_RETRY_SECONDS = 10.0  # after a failed `bb --version`, status() waits this long to run it again
DEFAULT_CRS_DIR = os.path.expanduser("~/.bb-crs")  # bb's own default for -c

Status = namedtuple("Status", "available version detail")
Status.__doc__ = """What BB.status() knows about bb.

available: bool. version: str (e.g. "5.0.0-nightly.20260710") or None when not
available. detail: the ELF description (describe_elf) when available, else why not.
"""


class BB:
    """The bb binary and the options every run shares: one per server, shared by its circuits.

    binary: path of bb. crs_dir: passed to bb as `-c` when not None (else bb uses
    ~/.bb-crs and downloads missing points). timeout: seconds allowed per bb run.
    verifier_target: bb's `-t` value, or None for bb's default. memory_limit_mb: cap
    on each bb run's memory in MiB (process.child_setup), or None for none.
    """

    def __init__(self, binary, crs_dir=None, timeout=90.0, verifier_target=None, memory_limit_mb=None):
        self.binary = binary
        self.crs_dir = crs_dir
        self.timeout = timeout
        self.verifier_target = verifier_target
        self.memory_limit_mb = memory_limit_mb
        self._seen = None  # (files.stamp, Status) of a bb that ran
        self._failed = None  # (files.stamp, monotonic time to retry) after a failed --version
        self._reading = Semaphore()  # one `bb --version` at a time

    @property
    def crs(self):
        """The CRS directory bb reads (str): crs_dir, else bb's default."""
        return self.crs_dir or DEFAULT_CRS_DIR

    def status(self, wait=None):
        """Return a Status about bb, cheaply.

        Runs `bb --version` and reads the ELF header only the first time and again
        when the file changes (files.stamp), or VERSION_RETRY_SECONDS after a
        failure; otherwise one stat() and one access() call, and no wait. Callers that ask
        while `bb --version` runs wait for that run's answer (one run at a time). wait: at
        most this many seconds for such a run (None: as long as it takes); past them the
        Status says "starting: bb --version is running" (health checks answer while a slow
        bb starts).
        """
        signature, known = self._known()
        if known is not None:
            return known
        if wait is None:
            return self._read(signature)
        reader = gevent.spawn(self._read, signature)
        reader.join(wait)
        return reader.get() if reader.ready() else Status(False, None, "starting: bb --version is running")

    def _known(self):
        """(files.stamp of the binary or None, its Status, or None when `bb --version` must run)."""
        try:
            signature = files.stamp(self.binary)
        except OSError as exc:
            self._seen = None
            return None, Status(False, None, f"{self.binary}: {exc.strerror}")
        if not os.access(self.binary, os.X_OK):
            return signature, Status(False, None, f"{self.binary}: not executable")
        if self._failed is not None and self._failed[0] == signature and time.monotonic() < self._failed[1]:
            return signature, Status(False, None, f"{self.binary}: does not run (bb --version failed)")
        if self._seen is not None and self._seen[0] == signature:
            return signature, self._seen[1]
        return signature, None

    def _read(self, signature):
        """Run `bb --version` and read the ELF header for the binary of `signature`; its Status."""
        with self._reading:
            _, known = self._known()  # read meanwhile by the caller we waited for, or failed
            if known is not None:
                return known
            try:
                elf = describe_elf(self.binary)
            except OSError as exc:
                elf = f"{self.binary}: {exc.strerror}"
            version = self._read_version()
            if version is None:  # not for good: a passing failure (fork, load) must not stick
                self._failed = (signature, time.monotonic() + VERSION_RETRY_SECONDS)
                return Status(False, None, f"{self.binary}: does not run (bb --version failed)")
            self._seen, self._failed = (signature, Status(True, version, elf)), None
            return self._seen[1]

    def version(self):
        """Return bb's version string (e.g. "5.0.0-nightly.20260710"); raises ProverUnavailable."""
        status = self.status()
        if not status.available:
            raise ProverUnavailable(status.detail)
        return status.version

    def _read_version(self):
        try:
            code, out, _ = run([self.binary, "--version"], VERSION_TIMEOUT_SECONDS)
        except ProverError:
            return None
        text = out.decode("utf-8", "replace").strip()
        return text if code == 0 and text else None

    def argv(self, command, *args):
        """[bb, command, *args, -t target, -c crs]: a full argument list for one bb run."""
        argv = [self.binary, command, *args]
        if self.verifier_target:
            argv += ["-t", self.verifier_target]
        if self.crs_dir:
            argv += ["-c", self.crs_dir]
        return argv

    def run(self, command, *args, timeout=None, scratch=None, keep_fds=(), threads=None):
        """Run `bb command *args` (see argv()) within `timeout` seconds (default: this BB's), under
        this BB's memory limit; return (returncode, stdout, stderr). scratch, keep_fds, threads:
        as for process.run().

        Raises ProverOutOfMemory when an allocation failed, ProverTimeout naming the
        command, and what process.run() raises.
        """
        timeout = timeout or self.timeout
        try:
            code, out, err = run(self.argv(command, *args), timeout, scratch, keep_fds, self.memory_limit_mb, threads)
        except ProverTimeout:
            raise ProverTimeout(f"bb {command} did not finish within {timeout:g} s") from None
        messages.raise_if_out_of_memory(code, err, self.memory_limit_mb)
        return code, out, err


_ELF_MACHINES = {3: "Intel 80386", 40: "ARM", 62: "x86-64", 183: "ARM aarch64", 243: "UCB RISC-V"}
_ELF_OSABI = {0: "SYSV", 3: "GNU/Linux"}
_PT_INTERP = 3


def describe_elf(path):
    """Describe an executable the way `file` does, from its ELF header, in pure Python.

    Returns e.g. "/app/bb: ELF 64-bit LSB executable, x86-64, version 1 (SYSV),
    dynamically linked, interpreter /lib64/ld-linux-x86-64.so.2", or
    "<path>: not an ELF file". Raises OSError if the file cannot be read.
    """
    with open(path, "rb") as f:
        ident = f.read(64)
        if len(ident) < 52 or ident[:4] != b"\x7fELF" or ident[4] not in (1, 2) or ident[5] not in (1, 2):
            return f"{path}: not an ELF file"
        bits = 64 if ident[4] == 2 else 32
        endian = "<" if ident[5] == 1 else ">"
        e_type, e_machine, e_version = struct.unpack(endian + "HHI", ident[16:24])
        if bits == 64:
            e_phoff, = struct.unpack(endian + "Q", ident[32:40])
            e_phentsize, e_phnum = struct.unpack(endian + "HH", ident[54:58])
        else:
            e_phoff, = struct.unpack(endian + "I", ident[28:32])
            e_phentsize, e_phnum = struct.unpack(endian + "HH", ident[42:46])
        interpreter = None
        for i in range(min(e_phnum, 64)):
            f.seek(e_phoff + i * e_phentsize)
            header = f.read(e_phentsize)
            if len(header) < (56 if bits == 64 else 32):
                break
            if struct.unpack(endian + "I", header[:4])[0] != _PT_INTERP:
                continue
            if bits == 64:
                offset, = struct.unpack(endian + "Q", header[8:16])
                size, = struct.unpack(endian + "Q", header[32:40])
            else:
                offset, = struct.unpack(endian + "I", header[4:8])
                size, = struct.unpack(endian + "I", header[16:20])
            f.seek(offset)
            interpreter = f.read(min(size, 256)).rstrip(b"\0").decode("ascii", "replace")
    kind = {1: "relocatable", 2: "executable", 3: "pie executable" if interpreter else "shared object",
            4: "core file"}.get(e_type, f"type {e_type}")
    parts = [f"ELF {bits}-bit {'LSB' if endian == '<' else 'MSB'} {kind}",
             _ELF_MACHINES.get(e_machine, f"machine {e_machine}"),
             f"version {e_version} ({_ELF_OSABI.get(ident[7], f'OS/ABI {ident[7]}')})"]
    if interpreter:
        parts += ["dynamically linked", f"interpreter {interpreter}"]
    elif e_type == 2:
        parts.append("statically linked")
    return f"{path}: " + ", ".join(parts)


