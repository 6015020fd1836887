"""One circuit's verification key, computed once by `bb write_vk` and cached on disk.

The cache holds one directory per (circuit bytes, bb version, verifier target): `vk`,
`vk_hash` and `circuit.json`, the private copy of the circuit bb proves, so a circuit file
edited on disk later is never paired with another circuit's VK. An image can bake the
cache in (scripts/precompute_vk.py), read-only and owned by root.
"""
import hashlib
import os
import shutil
import tempfile
import time

from gevent.lock import Semaphore

from bbworker import files
from bbworker.bbrunner import formats, messages
from bbworker.errors import BBExited, ProverCrashed, ProverError, ProverTimeout, ProverUnavailable, \
    ResourceUnavailable, ServerFault

CIRCUIT_FILE = "circuit.json"  # the private copy of the circuit, beside its VK


class VerificationKey:
    """The VK of `program` (bytes, the circuit JSON read from `path`) proved with `bb` (a BB),
    cached in `cache_dir`. public_inputs: the circuit's own count (int) the VK must state,
    or None when it cannot be told (undecodable circuit, rollup targets).

    `error` says why the last attempt to compute it failed (str), until one succeeds.
    """

    def __init__(self, bb, program, path, cache_dir, public_inputs=None):
        self.bb = bb
        self.program = program
        self.path = path
        self.cache_dir = cache_dir
        self.public_inputs = public_inputs
        self.sha256 = hashlib.sha256(program).hexdigest()
        self.error = None
        self._lock = Semaphore()
        self._read = None  # (vk path, vk bytes, vk_hash bytes)

    def directory(self):
        """The directory (str) holding `vk`, `vk_hash` and `circuit.json`; raises ProverUnavailable
        when bb cannot tell its version."""
        key = hashlib.sha256("\0".join(
            [self.sha256, self.bb.version(), self.bb.verifier_target or "default"]).encode()).hexdigest()
        return os.path.join(self.cache_dir, key[:32])

    def key(self):
        """A name (str) for this circuit with this bb version and target: its directory's, or the
        circuit's hash when bb cannot tell its version (proving then fails anyway)."""
        try:
            return os.path.basename(self.directory())
        except ProverError:
            return self.sha256[:32]

    def cached(self):
        """True when the VK is on disk already (ensure() would not run bb)."""
        return _complete(self.directory())

    def ensure(self, threads=None):
        """Return the path of `vk`, computing it with `bb write_vk` (`threads` for bb) if not cached.

        Single-flight: greenlets of one process share one run, processes serialise on a lock
        file in the cache dir. Raises ProverError subclasses as Circuit.prove() does.
        """
        target = self.directory()
        if _complete(target):
            return os.path.join(target, "vk")
        with self._lock:
            try:
                os.makedirs(os.path.dirname(self.cache_dir), exist_ok=True)
                files.private_dir(self.cache_dir, allow_root=True, mode=0o755)  # an image ships it
                lock = files.open_private(os.path.join(self.cache_dir, ".lock"), os.O_RDWR | os.O_CREAT)
            except OSError as exc:
                self.error = (f"cannot write the verification key cache {self.cache_dir}: {exc.strerror} "
                              "(set VK_CACHE_DIR to a writable directory, or bake the VK in)")
                raise ProverUnavailable(self.error) from None
            try:
                try:
                    files.flock_polled(lock, time.monotonic() + self.bb.timeout)
                except TimeoutError:
                    raise ProverTimeout("timed out waiting for another process to write the VK") from None
                if not _complete(target):
                    self._write(target, threads)
            except ProverError as exc:
                self.error = f"the verification key could not be computed: {exc.message}"
                raise
            finally:
                os.close(lock)
        self.error = None
        return os.path.join(target, "vk")

    def read(self):
        """Return (vk, vk_hash): the bytes of bb's `vk` and `vk_hash` files, computed if need be
        (ensure()) and kept in memory per directory. Raises ProverError subclasses."""
        vk = self.ensure()
        if self._read is None or self._read[0] != vk:
            try:
                with open(files.open_private(vk, allow_root=True), "rb") as f:
                    data = f.read()
                with open(files.open_private(os.path.join(os.path.dirname(vk), "vk_hash"), allow_root=True),
                          "rb") as f:
                    digest = f.read()
            except OSError as exc:
                raise ProverUnavailable(f"cannot read the verification key: {exc.strerror}") from None
            self._read = (vk, data, digest)
        return self._read[1], self._read[2]

    def matches(self, scratch, keep_fds=(), threads=None):
        """Compute the VK again with `bb write_vk` into `scratch` (an empty directory) and raise
        ServerFault unless it is the cached one: bb's VK depends only on the circuit, bb and the CRS
        points, so another one means the CRS (or bb) changed under the server, and every proof
        would fail verification. Raises what ensure() raises."""
        cached, _ = self.read()
        self._compute(scratch, keep_fds, threads)
        with open(os.path.join(scratch, "vk"), "rb") as f:
            if f.read() != cached:
                raise ServerFault(0, "bb computes another verification key than the cached one now: the CRS or "
                                     "bb changed under the server")

    def _write(self, target, threads=None):
        """Run `bb write_vk` into a temp dir, check it and move it to `target` (caller holds the lock)."""
        tmp = None
        try:
            tmp = tempfile.mkdtemp(prefix=os.path.basename(target) + ".tmp-", dir=self.cache_dir)
            os.chmod(tmp, 0o755)  # readable like the cache: an image's server user reads what the build wrote
            self._compute(tmp, (), threads)
            shutil.rmtree(target, ignore_errors=True)  # a partial one, e.g. `vk` removed by a cleaner
            os.replace(tmp, target)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    def _compute(self, directory, keep_fds, threads):
        """`bb write_vk` of a copy of the circuit written into `directory`; the VK checked (_check)."""
        try:
            program = os.path.join(directory, CIRCUIT_FILE)
            with open(program, "wb") as f:
                f.write(self.program)
            os.chmod(program, 0o644)
            code, _, err = self.bb.run("write_vk", "-b", program, "-o", directory, scratch=directory,
                                       keep_fds=keep_fds, threads=threads)
            try:
                if code != 0:
                    target_flag = f" -t {self.bb.verifier_target}" if self.bb.verifier_target else ""
                    raise messages.bb_error(code, err, (directory, self.path), witness=False,
                                            prefix=f"bb write_vk{target_flag} failed: ")
                self._check(directory)
            except BBExited as exc:
                raise messages.on_full_disk(exc, directory) from None
        except OSError as exc:
            raise ResourceUnavailable(None, f"cannot write the verification key: {exc.strerror}") from None

    def _check(self, directory):
        """Raise ProverCrashed unless bb wrote a usable `vk` and `vk_hash` into `directory`."""
        try:
            with open(os.path.join(directory, "vk"), "rb") as f:
                vk = f.read()
            with open(os.path.join(directory, "vk_hash"), "rb") as f:
                vk_hash = f.read()
        except FileNotFoundError as exc:
            raise ProverCrashed(0, f"bb write_vk exited 0 without writing the {os.path.basename(exc.filename)}") \
                from None
        problem = formats.vk_problem(vk, vk_hash, self.public_inputs)
        if problem:
            raise ProverCrashed(0, f"bb write_vk wrote an unusable verification key: {problem}")


def _complete(directory):
    return all(os.path.exists(os.path.join(directory, name)) for name in ("vk", "vk_hash", CIRCUIT_FILE))
