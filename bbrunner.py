"""Run the Barretenberg CLI (`bb`) to prove witnesses for Noir circuits.

BB is the binary (status, version, argument lists), shared by every Circuit;
a Circuit is one circuit's verification key and its proofs.

Knows nothing of HTTP. Formats are those of bb 5.0.0 (npm @aztec/bb.js 5.0.0)
and Noir 1.0.0-beta.26: the circuit is nargo's/noir_wasm's program JSON (ACIR
bytecode), a witness is the gzipped msgpack witness stack that `nargo execute`
or noir_js `execute()` write, and bb writes UltraHonk proofs as raw bytes.

bb runs as a child process with a fixed argument list, in its own process
group, through gevent's subprocess module so a gevent worker keeps serving
while it runs; it dies with the process that started it (child_setup), and its
output goes to unlinked temp files, never pipes, so a descendant that keeps a
pipe open cannot hold a finished run. Failures are raised as ProverError
subclasses, told apart by bb's messages (bbformat.classify): the witness's fault
(ProverFailed) or ours (ServerFault and its subclasses, ProverCrashed).
"""
import hashlib
import logging
import os
import re
import resource
import shutil
import signal
import struct
import tempfile
import time
from collections import namedtuple

import gevent
from gevent import subprocess
from gevent.lock import Semaphore

import bbformat
import ownership
import witness

FIELD_BYTES = bbformat.FIELD_BYTES  # BN254 scalar field element, big-endian, in bb's public_inputs file
KILL_WAIT_SECONDS = 5.0
BB_NICE = 10  # bb's CPU priority below the server's (os.nice increment, 0..19)
VERSION_TIMEOUT_SECONDS = 30.0
OUTPUT_KEEP_BYTES = 512 * 1024  # of each of bb's stdout and stderr: the first and the last this many
DEFAULT_CRS_DIR = os.path.expanduser("~/.bb-crs")  # bb's own default for -c
VERSION_RETRY_SECONDS = 10.0  # after a failed `bb --version`, status() waits this long to run it again
# bb's stderr when an allocation failed: it aborts (SIGABRT), or exits 1 when no thread can start.
OUT_OF_MEMORY_MARKERS = (b"std::bad_alloc", b"Cannot allocate memory", b"thread constructor failed")
# Public inputs every bb 5 UltraHonk VK counts beyond the circuit's own: the pairing point object.
PAIRING_POINT_FIELDS = 8
# Proof length in 32-byte fields per verifier target, measured with bb 5.0.0: (fixed, per log2 rows).
# The recursive targets pad to a constant size; the evm ones grow with the circuit.
PROOF_FIELDS = {None: (458, 0), "noir-recursive": (458, 0), "noir-recursive-no-zk": (410, 0),
                "evm": (82, 12), "evm-no-zk": (67, 11)}
LOW_SPACE_BYTES = 1 << 20  # a short proof with less than this free beside it: the disk filled
CIRCUIT_FILE = "circuit.json"  # the private copy of the circuit, beside its VK


# ---------------------------------------------------------------- errors

class ProverError(Exception):
    """Base of everything this module raises about proving."""
    returncode = None  # bb's exit status where bb ran to the end (negative: killed by that signal)


class ProverUnavailable(ProverError):
    """bb is missing, not executable or cannot start."""


class BBExited(ProverError):
    """bb ran to the end and the outcome is an error.

    `returncode` is bb's exit status; `reason` is one readable line from its output.
    """

    def __init__(self, returncode, reason):
        super().__init__(reason)
        self.returncode = returncode
        self.reason = reason


class ProverFailed(BBExited):
    """bb rejected the witness: unsatisfied constraints, wrong circuit, bad encoding."""


class ProverCrashed(BBExited):
    """bb died from a signal or exited without writing its output files."""


class ServerFault(BBExited):
    """bb failed for a reason of ours, not the witness's: a setting bb rejects, or a failure we
    cannot place (bbformat.CONFIG, bbformat.SERVER)."""


class ResourceUnavailable(ServerFault):
    """A resource of ours that bb needs failed: disk space, or one of our files
    (bbformat.NO_SPACE, bbformat.FILES). Passing: retry later."""


class CrsUnavailable(ResourceUnavailable):
    """bb could not read enough CRS points and tried to download them (bbformat.CRS)."""


class ProverTimeout(ProverError):
    """bb did not finish within the deadline; its process group was killed."""


class ProverOutOfMemory(BBExited):
    """An allocation in bb failed: over `limit_mb` (the memory limit, MiB; None: the host's)."""

    def __init__(self, returncode, limit_mb):
        limit = f" (limit {limit_mb} MiB)" if limit_mb else ""
        super().__init__(returncode, f"bb ran out of memory{limit}")
        self.limit_mb = limit_mb


class ProofRejected(BBExited):
    """`bb verify` rejected the proof that `bb prove` wrote, and bb reported no unsatisfied constraint."""


Proof = namedtuple("Proof", "proof public_inputs")
Proof.__doc__ = """A proof from `bb prove`.

proof: bytes, the content of bb's `proof` file (UltraHonk, binary).
public_inputs: list of str, one "0x" + 64 hex digits per 32-byte big-endian field
element of bb's `public_inputs` file, in circuit order.
"""


# ---------------------------------------------------------------- processes

def run(argv, timeout, scratch=None, keep_fds=(), memory_limit_mb=None, threads=None):
    """Run `argv` (a list of str, never through a shell); return (returncode, stdout, stderr).

    The child gets no stdin, a process group of its own in our session, child_setup(), and
    unlinked temp files in `scratch` (a directory; default: tempfile's) as stdout
    and stderr, returned as bytes (at most the first and last OUTPUT_KEEP_BYTES of
    each). keep_fds: descriptors the child inherits (the proof slot's lock, so the
    slot stays taken while bb lives). memory_limit_mb: see child_setup(). threads (int) sets
    `HARDWARE_CONCURRENCY`, the thread count bb 5 reads at start (None: bb's default, every
    core). When it exits, and on timeout (seconds) or any
    exception (a gevent Timeout or kill included), the whole group gets SIGKILL, so
    no descendant outlives the run. Raises ProverUnavailable if the program cannot
    start, ResourceUnavailable if the temp files cannot be made, ProverTimeout on expiry.
    """
    parent = os.getpid()
    try:
        out = tempfile.TemporaryFile(dir=scratch)
        err = tempfile.TemporaryFile(dir=scratch)
    except OSError as exc:
        raise ResourceUnavailable(None, f"cannot make bb's output files in {scratch}: {exc.strerror}") from None
    with out, err:
        try:
            proc = _start(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                          process_group=0, close_fds=True, pass_fds=tuple(keep_fds),
                          preexec_fn=lambda: child_setup(parent, memory_limit_mb),
                          env=child_env(threads))
        except (OSError, subprocess.SubprocessError) as exc:
            raise ProverUnavailable(f"cannot run {os.path.basename(argv[0])}: "
                                    f"{getattr(exc, 'strerror', None) or exc}") from None
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            raise ProverTimeout(f"bb did not finish within {timeout:g} s") from None
        except BaseException:
            kill_group(proc)
            raise
        kill_group(proc)  # descendants bb left behind
        return proc.returncode, _read_kept(out), _read_kept(err)


def _start(argv, **popen_args):
    """subprocess.Popen(argv, **popen_args), and the child killed even if the caller is interrupted.

    gevent's Popen waits cooperatively for the child's exec, so an exception raised into
    the calling greenlet meanwhile (a client hang-up, a gevent Timeout) would leave a bb
    running that nobody kills. The start runs in a greenlet of its own; when the caller is
    interrupted, kill_group() runs on the child as soon as it exists.
    """
    starter = gevent.spawn(subprocess.Popen, argv, **popen_args)
    try:
        return starter.get()
    except BaseException:
        starter.link_value(lambda done: kill_group(done.value))  # at once if it already started
        raise


def _read_kept(f):
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    if size <= 2 * OUTPUT_KEEP_BYTES:
        return f.read()
    head = f.read(OUTPUT_KEEP_BYTES)
    f.seek(size - OUTPUT_KEEP_BYTES)
    return head + b"\n...\n" + f.read()


def child_setup(parent_pid, memory_limit_mb=None):
    """In the child, between fork and exec: the one place bb's process settings are made.

    parent_pid: the pid of the worker starting bb; bb gets SIGKILL when that process
    dies (ownership.die_with_parent), so a killed worker leaves no bb. bb runs at
    nice BB_NICE: the server's own processes come first, so health checks and
    uploads are answered at once while bb saturates the cores; a lone proof loses
    nothing (no other process wants the CPU). run() keeps bb in the server's session:
    where the kernel groups CPU time by session (sched_autogroup, on when processes
    share the root cgroup), a session of bb's own would be a group as heavy as the
    server's, and the nice would count for nothing against it. memory_limit_mb (int or None) caps bb's
    data segment (RLIMIT_DATA: heap and private writable mappings, what bb actually
    fills). RLIMIT_AS would count bb's reserved but unused address space too, which grows
    with its thread count (measured at 2^18 rows: 391 MiB at 2 threads, 1.5 GiB at 32,
    for a resident peak of 290-340 MiB).
    """
    ownership.die_with_parent(parent_pid)
    os.nice(BB_NICE)
    if memory_limit_mb:
        limit = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def child_env(threads=None):
    """bb's environment (dict, or None to inherit ours): ours, with HARDWARE_CONCURRENCY = `threads`."""
    if threads is None:
        return None
    return dict(os.environ, HARDWARE_CONCURRENCY=str(threads))


def kill_group(proc):
    """SIGKILL the process group led by `proc` and reap `proc` (bounded wait)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=KILL_WAIT_SECONDS)
    except subprocess.TimeoutExpired:
        pass


# ---------------------------------------------------------------- bb output

_MEM_SUFFIX = re.compile(r"\s*\(mem: [^)]*\)\s*$")
_NOISE = ("Scheme is:", "CircuitProve:", "Public inputs saved", "Proof saved", "VK saved",
          "VK Hash saved", "(Experimental)", "Run with --help")


def failure_reason(stderr, hide=()):
    """Pick one readable line (str) out of bb's stderr (bytes) to explain a failure.

    Prefers bb's "Reason : ..." line, then "Assertion failed: ...", then the last
    line that is not progress noise. The strings in `hide` (temp paths) are replaced
    by their base names; the result is at most 300 characters.
    """
    lines = []
    for raw in stderr.decode("utf-8", "replace").splitlines():
        line = _MEM_SUFFIX.sub("", raw).strip()
        if line and not line.startswith(_NOISE):
            lines.append(line)
    reason = None
    for line in lines:
        if line.startswith("Reason"):
            reason = line.split(":", 1)[-1].strip()
            break
    if reason is None:
        asserts = [line for line in lines if line.startswith("Assertion failed")]
        reason = asserts[0] if asserts else (lines[-1] if lines else "no output")
    for path in sorted(hide, key=len, reverse=True):
        if path:
            reason = reason.replace(path, os.path.basename(path))
    return reason[:300]


_KINDS = {bbformat.WITNESS: ProverFailed, bbformat.CRS: CrsUnavailable, bbformat.NO_SPACE: ResourceUnavailable,
          bbformat.FILES: ResourceUnavailable, bbformat.CONFIG: ServerFault, bbformat.SERVER: ServerFault,
          bbformat.SIGNAL: ProverCrashed}


def bb_error(returncode, stderr, hide=(), witness=True, prefix=""):
    """The BBExited subclass instance for a bb run that failed, by whose fault (bbformat.classify).

    returncode: bb's exit status (negative: the signal). stderr: bytes. hide: paths
    shown by base name only (failure_reason). witness: False for runs without a
    witness (write_vk), where nothing can be the client's fault. prefix: put before
    the reason (e.g. "bb write_vk failed: ").
    """
    kind = bbformat.classify(returncode, stderr)
    if kind == bbformat.SIGNAL:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:  # real-time signals have no name
            name = str(-returncode)
        reason = f"bb was killed by signal {name}"
    elif kind == bbformat.WITNESS and bbformat.UNSATISFIED in stderr and returncode == 0:
        reason = "the witness does not satisfy the circuit's constraints"
    elif kind == bbformat.CRS:
        reason = "the CRS lacks points bb needs (it tried to download them): " + failure_reason(stderr, hide)
    else:
        reason = failure_reason(stderr, hide)
    cls = _KINDS[kind]
    if cls is ProverFailed and not witness:
        cls = ServerFault
    return cls(returncode, prefix + reason)


def on_full_disk(error, path):
    """`error` (a BBExited), or a ResourceUnavailable in its place when `path`'s file system has
    less than LOW_SPACE_BYTES free: bb does not check every write, so a full disk shows as
    anything from a short proof to exit 1 with nothing on stderr. The witness's own fault
    (ProverFailed: bb named it) and out-of-memory are kept as they are.
    """
    if isinstance(error, (ProverFailed, ProverOutOfMemory, ResourceUnavailable)):
        return error
    try:
        full = shutil.disk_usage(path).free < LOW_SPACE_BYTES
    except OSError:
        return error
    if not full:
        return error
    return ResourceUnavailable(error.returncode, f"{error.reason}, and its file system is full")


def parse_public_inputs(data):
    """Split bb's `public_inputs` file (bytes, 32 bytes per field element) into 0x-hex strings.

    Raises ValueError if the length is not a multiple of 32.
    """
    if len(data) % FIELD_BYTES:
        raise ValueError(f"public_inputs is {len(data)} bytes, not a multiple of {FIELD_BYTES}")
    return ["0x" + data[i:i + FIELD_BYTES].hex() for i in range(0, len(data), FIELD_BYTES)]


# ---------------------------------------------------------------- ELF

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


# ---------------------------------------------------------------- bb, the binary

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
    on each bb run's memory in MiB (child_setup), or None for none.
    """

    def __init__(self, binary, crs_dir=None, timeout=90.0, verifier_target=None, memory_limit_mb=None):
        self.binary = binary
        self.crs_dir = crs_dir
        self.timeout = timeout
        self.verifier_target = verifier_target
        self.memory_limit_mb = memory_limit_mb
        self._seen = None  # (stat signature, Status) of a bb that ran
        self._failed = None  # (stat signature, monotonic time to retry) after a failed --version

    def _signature(self):
        st = os.stat(self.binary)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def status(self):
        """Return a Status about bb, cheaply.

        Runs `bb --version` and reads the ELF header only the first time and again
        when the file changes (inode, size, mtime), or VERSION_RETRY_SECONDS after a
        failure; otherwise one stat() and one access() call.
        """
        try:
            signature = self._signature()
        except OSError as exc:
            self._seen = None
            return Status(False, None, f"{self.binary}: {exc.strerror}")
        if not os.access(self.binary, os.X_OK):
            return Status(False, None, f"{self.binary}: not executable")
        failed = Status(False, None, f"{self.binary}: does not run (bb --version failed)")
        if self._failed is not None and self._failed[0] == signature and time.monotonic() < self._failed[1]:
            return failed  # a failure is retried after a while, not on every call
        if self._seen is None or self._seen[0] != signature:
            try:
                elf = describe_elf(self.binary)
            except OSError as exc:
                elf = f"{self.binary}: {exc.strerror}"
            version = self._read_version()
            if version is None:  # not for good: a passing failure (fork, load) must not stick
                self._failed = (signature, time.monotonic() + VERSION_RETRY_SECONDS)
                return failed
            self._seen, self._failed = (signature, Status(True, version, elf)), None
        return self._seen[1]

    def binary_arch(self):
        """Return `file`-style text about bb's ELF header (str), from the cache status() keeps."""
        return self.status().detail

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
        this BB's memory limit; return (returncode, stdout, stderr). scratch, keep_fds, threads: as for run().

        Raises ProverOutOfMemory when an allocation failed, ProverTimeout naming the
        command, and what run() raises.
        """
        timeout = timeout or self.timeout
        try:
            code, out, err = run(self.argv(command, *args), timeout, scratch, keep_fds, self.memory_limit_mb, threads)
        except ProverTimeout:
            raise ProverTimeout(f"bb {command} did not finish within {timeout:g} s") from None
        if code != 0 and any(marker in err for marker in OUT_OF_MEMORY_MARKERS):
            raise ProverOutOfMemory(code, self.memory_limit_mb)
        return code, out, err


# ---------------------------------------------------------------- one circuit

class Circuit:
    """One circuit proved with a shared BB: its verification key and its proofs.

    bb: the BB. path: the circuit JSON, read once here: bb only ever sees a private copy of
    these bytes, kept beside their VK, so a file changed on disk later cannot be paired with
    this VK. vk_cache_dir: where verification keys are cached, one subdirectory per (circuit
    bytes, bb version, verifier target). verify: run `bb verify` on every proof before
    prove() returns it. verify_timeout: seconds one `bb verify` may run, the one in prove()
    and verify()'s (None: the BB's timeout). Raises OSError. `acir` is the witness.Circuit decoded from the same
    bytes (witness checks), or None when it cannot be decoded (`acir_error` says why; bb then
    judges the circuit and its witnesses alone, readiness reporting what bb says).
    """

    def __init__(self, bb, path, vk_cache_dir, verify=True, verify_timeout=None):
        self.bb = bb
        self.path = path
        self.vk_cache_dir = vk_cache_dir
        self.verify_proofs = verify
        self.verify_timeout = verify_timeout
        with open(path, "rb") as f:
            self.program = f.read()
        self.sha256 = hashlib.sha256(self.program).hexdigest()
        try:
            self.acir, self.acir_error = witness.Circuit.from_json(self.program), None
        except witness.CircuitError as exc:
            self.acir, self.acir_error = None, str(exc)
            logging.getLogger("bb_worker").warning("%s: witnesses are not checked before bb: %s", path, exc)
        self._vk_cache = None  # (vk path, vk bytes, vk_hash bytes)
        self._vk_lock = Semaphore()
        self.vk_error = None  # why the last attempt to compute the VK failed (str), until one succeeds

    @property
    def verifier_target(self):
        return self.bb.verifier_target

    def version(self):
        """bb's version (BB.version)."""
        return self.bb.version()

    # -- verification key

    def vk_dir(self):
        """Directory (str) holding `vk` and `vk_hash` for this circuit, bb version and target."""
        key = hashlib.sha256("\0".join(
            [self.sha256, self.bb.version(), self.bb.verifier_target or "default"]).encode()).hexdigest()
        return os.path.join(self.vk_cache_dir, key[:32])

    def ensure_vk(self, threads=None):
        """Return the path of the circuit's VK, computing it with `bb write_vk` if not cached.

        Single-flight: greenlets of one process share one run, processes serialise
        on a lock file in the cache dir. Raises ProverError subclasses as prove() does.
        """
        target = self.vk_dir()
        vk = os.path.join(target, "vk")
        if self._vk_complete(target):
            return vk
        with self._vk_lock:
            try:
                os.makedirs(os.path.dirname(self.vk_cache_dir), exist_ok=True)
                ownership.private_dir(self.vk_cache_dir, allow_root=True, mode=0o755)  # an image ships it
                lock = ownership.open_private(os.path.join(self.vk_cache_dir, ".lock"), os.O_RDWR | os.O_CREAT)
            except OSError as exc:
                self.vk_error = (f"cannot write the verification key cache {self.vk_cache_dir}: {exc.strerror} "
                                 "(set VK_CACHE_DIR to a writable directory, or bake the VK in)")
                raise ProverUnavailable(self.vk_error) from None
            try:
                try:
                    ownership.flock_polled(lock, time.monotonic() + self.bb.timeout)
                except TimeoutError:
                    raise ProverTimeout("timed out waiting for another process to write the VK") from None
                if not self._vk_complete(target):
                    self._write_vk(target, threads)
            except ProverError as exc:
                self.vk_error = f"the verification key could not be computed: {exc}"
                raise
            finally:
                os.close(lock)
        self.vk_error = None
        return vk

    def key(self):
        """A name (str) for this circuit with this bb version and target: its VK directory's.

        Falls back to the circuit's hash when bb cannot tell its version (proving then fails anyway)."""
        try:
            return os.path.basename(self.vk_dir())
        except ProverError:
            return self.sha256[:32]

    def vk_cached(self):
        """True when the VK is on disk already (ensure_vk would not run bb)."""
        return self._vk_complete(self.vk_dir())

    @staticmethod
    def _vk_complete(target):
        return all(os.path.exists(os.path.join(target, name)) for name in ("vk", "vk_hash", CIRCUIT_FILE))

    def vk_bytes(self):
        """Return (vk, vk_hash): the bytes of bb's `vk` and `vk_hash` files (bb 5 binary format).

        Computes the VK if needed (ensure_vk); cached in memory per VK directory.
        """
        vk = self.ensure_vk()
        if self._vk_cache is None or self._vk_cache[0] != vk:
            try:
                with open(ownership.open_private(vk, allow_root=True), "rb") as f:
                    data = f.read()
                with open(ownership.open_private(os.path.join(os.path.dirname(vk), "vk_hash"), allow_root=True),
                          "rb") as f:
                    digest = f.read()
            except OSError as exc:
                raise ProverUnavailable(f"cannot read the verification key: {exc.strerror}") from None
            self._vk_cache = (vk, data, digest)
        return self._vk_cache[1], self._vk_cache[2]

    def _write_vk(self, target, threads=None):
        """Run `bb write_vk` into a temp dir and move it to `target` (caller holds the lock)."""
        tmp = None
        try:
            tmp = tempfile.mkdtemp(prefix=os.path.basename(target) + ".tmp-", dir=self.vk_cache_dir)
            os.chmod(tmp, 0o755)  # readable like the cache: an image's server user reads what the build wrote
            program = os.path.join(tmp, CIRCUIT_FILE)
            with open(program, "wb") as f:
                f.write(self.program)
            os.chmod(program, 0o644)
            code, _, err = self.bb.run("write_vk", "-b", program, "-o", tmp, scratch=tmp, threads=threads)
            try:
                if code != 0:
                    target_flag = f" -t {self.verifier_target}" if self.verifier_target else ""
                    raise bb_error(code, err, (tmp, self.path), witness=False,
                                   prefix=f"bb write_vk{target_flag} failed: ")
                if not os.path.exists(os.path.join(tmp, "vk")):
                    raise ProverCrashed(code, "bb write_vk failed: it exited 0 without writing the vk")
                self.check_vk(tmp)
            except BBExited as exc:
                raise on_full_disk(exc, tmp) from None
            shutil.rmtree(target, ignore_errors=True)  # a partial one, e.g. `vk` removed by a cleaner
            os.replace(tmp, target)
        except OSError as exc:
            raise ResourceUnavailable(None, f"cannot write the verification key: {exc.strerror}") from None
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    def check_vk(self, vk_dir):
        """Check the `vk` and `vk_hash` bb wrote into `vk_dir` before they are cached.

        A bb 5 UltraHonk VK is 32-byte fields: log2 of the circuit size, the number of public
        inputs (the circuit's plus PAIRING_POINT_FIELDS), their offset, then commitments;
        `vk_hash` is one field. Raises ProverCrashed naming what does not fit.
        """
        try:
            with open(os.path.join(vk_dir, "vk"), "rb") as f:
                vk = f.read()
            with open(os.path.join(vk_dir, "vk_hash"), "rb") as f:
                vk_hash = f.read()
        except FileNotFoundError as exc:
            raise ProverCrashed(0, f"bb write_vk wrote no {os.path.basename(exc.filename)}") from None
        problem = None
        if len(vk_hash) != FIELD_BYTES:
            problem = f"vk_hash is {len(vk_hash)} bytes, not {FIELD_BYTES}"
        elif len(vk) % FIELD_BYTES or len(vk) < 3 * FIELD_BYTES:
            problem = f"vk is {len(vk)} bytes, not a whole number of fields"
        elif (size_error := _log_size_error(vk)):
            problem = size_error
        elif self.acir and vk_public_inputs(vk) != self.acir.public_inputs + PAIRING_POINT_FIELDS and \
                not self._rollup():
            problem = (f"vk counts {vk_public_inputs(vk)} public inputs; the circuit has {self.acir.public_inputs} "
                       f"(+{PAIRING_POINT_FIELDS} pairing point fields)")
        if problem:
            raise ProverCrashed(0, f"bb write_vk wrote an unusable verification key: {problem}")

    def _rollup(self):
        return (self.bb.verifier_target or "").startswith("noir-rollup")

    def problems(self):
        """Why a proof of this circuit cannot succeed now (list of str; empty: it can).

        Cheap: a few stat() calls, the VK read once. "starting: ..." until the VK is
        computed; then the CRS must hold the 2^k G1 points the VK's circuit size k
        needs (bbformat). Says nothing while bb itself is unusable (health.py reports
        that).
        """
        try:
            vk = os.path.join(self.vk_dir(), "vk")
        except ProverError:
            return []
        if not os.path.exists(vk):
            return [self.vk_error or "starting: the verification key is being computed"]
        try:
            log_n = bbformat.vk_log_circuit_size(self.vk_bytes()[0])
        except (ProverError, ValueError) as exc:
            return [f"the verification key is unusable: {exc}"]
        crs = self.bb.crs_dir or DEFAULT_CRS_DIR
        try:
            points = bbformat.crs_info(crs).points
        except OSError as exc:
            return [f"CRS unavailable: {crs}: {exc.strerror}"]
        need = bbformat.crs_points_needed(log_n)
        if points < need:
            return [f"CRS too small: {crs} holds {points} G1 points; this circuit (2^{log_n} rows) needs {need}"]
        return []

    # -- proving

    def prove(self, witness_path, workdir, keep_fds=(), threads=None):
        """Prove one witness; return a Proof that `bb verify` accepted (when verify is on).

        witness_path: the gzipped witness (Noir 1.0.0-beta.26 witness stack).
        workdir: an empty directory bb may write into (the caller removes it).
        keep_fds: descriptors bb inherits (the proof slot's lock). threads: bb's thread
        count (HARDWARE_CONCURRENCY), None for bb's default (every core).
        Raises ProverFailed (the witness's fault: bb rejected it), ProverTimeout,
        ProverOutOfMemory, ServerFault (ours; CrsUnavailable and ResourceUnavailable among
        them, the latter also for a short proof on a full disk), ProofRejected (bb verify
        said no), ProverCrashed (signal, or unusable output) or ProverUnavailable.
        Steps: the VK, `bb prove` on the private copy of the circuit, its exit status and
        stderr, its output files checked against the VK, `bb verify`.
        """
        vk = self.ensure_vk(threads)
        program = os.path.join(os.path.dirname(vk), CIRCUIT_FILE)
        code, _, err = self.bb.run("prove", "-b", program, "-w", witness_path, "-k", vk, "-o", workdir,
                                   scratch=workdir, keep_fds=keep_fds, threads=threads)
        try:
            if code != 0 or bbformat.UNSATISFIED in err:
                raise bb_error(code, err, (workdir, witness_path, program, vk, self.bb.crs_dir or ""))
            proof = read_proof(workdir, code)
            self.check_proof(proof)
        except BBExited as exc:
            raise on_full_disk(exc, workdir) from None
        if self.verify_proofs and not self.verify(os.path.join(workdir, "proof"),
                                                  os.path.join(workdir, "public_inputs")):
            raise ProofRejected(code, "proof failed verification: bb verify rejects the proof bb prove wrote")
        return proof

    def check_proof(self, proof):
        """Check a Proof's length and number of public inputs against the VK; ProverCrashed if off."""
        vk, _ = self.vk_bytes()
        wanted = vk_public_inputs(vk) - PAIRING_POINT_FIELDS
        if len(proof.public_inputs) != wanted and not self._rollup():
            raise ProverCrashed(0, f"bb wrote {len(proof.public_inputs)} public inputs; the VK says {wanted}")
        fixed, per_log_size = PROOF_FIELDS.get(self.bb.verifier_target, (None, None))
        size = FIELD_BYTES * (fixed + per_log_size * bbformat.vk_log_circuit_size(vk)) if fixed else None
        if not proof.proof or len(proof.proof) % FIELD_BYTES or (size and len(proof.proof) != size):
            expected = f"{size}" if size else "a whole number of 32-byte fields"
            raise ProverCrashed(0, f"bb wrote a proof of {len(proof.proof)} bytes; this VK's proofs are {expected}")

    # -- verifying

    def verify(self, proof_path, public_inputs_path):
        """`bb verify` a proof with this circuit's VK: True if bb accepts it, False if it rejects it.

        proof_path: an UltraHonk proof as `bb prove` writes it (whole 32-byte field
        elements). public_inputs_path: 32-byte big-endian field elements, bb's
        `public_inputs` format. Raises ProverTimeout (after verify_timeout seconds),
        ProverUnavailable, or a BBExited subclass when bb fails for a reason other than
        the proof (verify_verdict).
        """
        vk = self.ensure_vk()
        code, _, err = self.bb.run("verify", "-k", vk, "-p", proof_path, "-i", public_inputs_path,
                                   timeout=self.verify_timeout)
        return verify_verdict(code, err)


# bb 5 `bb verify` exits 1 both when it rejects a proof and when it cannot run (a missing
# CRS it fails to download, an unreadable or wrong-size VK). Only these stderr lines,
# about the proof or its public inputs, make a 1 a rejection; anything else is ours.
VERIFY_REJECTIONS = (b"Proof verification failed", b"verification failed at", b"invalid proof size",
                     b"Non-canonical", b"num_public_inputs mismatch",
                     b"proof file size must be a multiple", b"public inputs file size must be a multiple",
                     b"bad proof serde", b"not on the curve")  # proof fields out of range, bad points
VERIFY_FAULTS = (b"VK size", b"Unable to open file", b"HTTP request failed", b"crs", b"CRS")


def verify_verdict(returncode, stderr):
    """True/False for `bb verify`'s exit status and stderr (bytes): accepted or rejected proof.

    Raises the BBExited subclass bb_error gives (bbformat.classify: CrsUnavailable for
    a CRS bb tried to download, ProverCrashed for a signal, ...) when bb did not judge
    the proof (see VERIFY_REJECTIONS).
    """
    if returncode == 0:
        return True
    if returncode == 1 and any(m in stderr for m in VERIFY_REJECTIONS) and \
            not any(m in stderr for m in VERIFY_FAULTS):
        return False
    raise bb_error(returncode, stderr, witness=False, prefix="bb verify failed: ")


def read_proof(workdir, returncode=0):
    """Read bb's `proof` and `public_inputs` from `workdir` into a Proof; ProverCrashed if unusable."""
    try:
        with open(os.path.join(workdir, "proof"), "rb") as f:
            proof = f.read()
        with open(os.path.join(workdir, "public_inputs"), "rb") as f:
            public_inputs = parse_public_inputs(f.read())
    except (OSError, ValueError) as exc:
        raise ProverCrashed(returncode, f"bb exited 0 without usable output: {exc}") from None
    return Proof(proof, public_inputs)


def _log_size_error(vk):
    """Why bbformat.vk_log_circuit_size rejects `vk` (str), or None when it states a plausible size."""
    try:
        bbformat.vk_log_circuit_size(vk)
    except ValueError as exc:
        return str(exc)
    return None


def vk_public_inputs(vk):
    """The number of public inputs a bb 5 binary VK (bytes) counts: its second field."""
    return int.from_bytes(vk[FIELD_BYTES:2 * FIELD_BYTES], "big")
