"""One circuit: its verification key, its proofs, their verification, and whether it can be proved now.

Formats are those of bb 5.0.0 (npm @aztec/bb.js 5.0.0) and Noir 1.0.0-beta.26: the circuit is
nargo's / noir_wasm's program JSON (ACIR bytecode), a witness is the gzipped msgpack witness
stack `nargo execute` or noir_js `execute()` write, and bb writes UltraHonk proofs as raw bytes.
"""
import logging
import os
from collections import namedtuple

from bbworker.bbrunner import acir, formats, messages
from bbworker.bbrunner.vk import CIRCUIT_FILE, VerificationKey
from bbworker.errors import BBExited, ProofRejected, ProverCrashed, ProverError, ProverFailed, ResourceUnavailable

ProofShape = namedtuple("ProofShape", "proof_bytes public_inputs max_public_inputs")
ProofShape.__doc__ = """What every proof of a circuit is, from its VK: proof_bytes (int, the `proof`
file's length; None where the verifier target does not pin it), public_inputs (int, their count;
None for the rollup targets, whose proofs carry more), max_public_inputs (int, at most)."""

Proof = namedtuple("Proof", "proof public_inputs")
Proof.__doc__ = """A proof from `bb prove`.

proof: bytes, the content of bb's `proof` file (UltraHonk, binary).
public_inputs: list of str, one "0x" + 64 hex digits per 32-byte big-endian field
element of bb's `public_inputs` file, in circuit order.
"""


class Circuit:
    """One circuit proved with a shared bb.BB.

    path: the circuit JSON, read once here (bb only ever proves a private copy of these
    bytes, kept beside their VK). vk_cache_dir: where the VK is cached (vk.VerificationKey).
    verify: run `bb verify` on every proof before prove() returns it. verify_timeout: seconds
    one `bb verify` may run (None: the BB's timeout). Raises OSError. `acir` is the
    acir.Program decoded from the same bytes (the witness checks), or None when it cannot be
    decoded (`acir_error` says why; bb then judges the circuit and its witnesses alone).
    """

    def __init__(self, bb, path, vk_cache_dir, verify=True, verify_timeout=None):
        self.bb = bb
        self.path = path
        self.verify_proofs = verify
        self.verify_timeout = verify_timeout
        with open(path, "rb") as f:
            program = f.read()
        try:
            self.acir, self.acir_error = acir.Program.from_json(program), None
        except acir.CircuitError as exc:
            self.acir, self.acir_error = None, str(exc)
            logging.getLogger("bb_worker").warning("%s: witnesses are not checked before bb: %s", path, exc)
        counted = self.acir.public_inputs if self.acir and not self._rollup() else None
        self.vk = VerificationKey(bb, program, path, vk_cache_dir, counted)

    @property
    def verifier_target(self):
        return self.bb.verifier_target

    def _rollup(self):
        return (self.bb.verifier_target or "").startswith("noir-rollup")

    def problems(self):
        """Why a proof of this circuit cannot succeed now (list of str; empty: it can).

        Cheap: a few stat() calls, the VK read once. "starting: ..." until the VK is computed;
        then the CRS must hold the 2^k G1 points the VK's circuit size k needs, and (when proofs
        are verified) be the Ignition ceremony's. Says nothing while bb itself is unusable (the
        caller reports that).
        """
        try:
            vk = os.path.join(self.vk.directory(), "vk")
        except ProverError:
            return []
        if not os.path.exists(vk):
            return [self.vk.error or "starting: the verification key is being computed"]
        try:
            log_n = formats.vk_log_circuit_size(self.vk.read()[0])
        except (ProverError, ValueError) as exc:
            return [f"the verification key is unusable: {getattr(exc, 'message', exc)}"]
        try:
            points = formats.crs_points(self.bb.crs)
        except OSError as exc:
            return [f"CRS unavailable: {self.bb.crs}: {exc.strerror}"]
        need = formats.crs_points_needed(log_n)
        if points < need:
            return [f"CRS too small: {self.bb.crs} holds {points} G1 points; this circuit (2^{log_n} rows) needs {need}"]
        try:
            if self.verify_proofs and not formats.crs_is_ignition(self.bb.crs):
                return [f"CRS not the Aztec Ignition ceremony's: {self.bb.crs}/{formats.G1_FILE} (bb verify pins its "
                        "G2 point, so every proof would fail verification; VERIFY_PROOFS=0 serves it unverified)"]
        except OSError as exc:
            return [f"CRS unavailable: {self.bb.crs}: {exc.strerror}"]
        return []

    # -- proving

    def prove(self, witness_path, workdir, keep_fds=(), threads=None):
        """Prove one witness; return a Proof that `bb verify` accepted (when verify is on).

        witness_path: the gzipped witness (Noir 1.0.0-beta.26 witness stack). workdir: an
        empty directory bb may write into (the caller removes it). keep_fds: descriptors bb
        inherits (the proof slot's locks). threads: bb's thread count (HARDWARE_CONCURRENCY),
        None for bb's default (every core). Raises ProverFailed (the witness's fault: bb
        named it), ProverTimeout, ProverOutOfMemory, ServerFault (ours; CrsUnavailable and
        ResourceUnavailable among them, the latter also for a short proof on a full disk),
        ProofRejected (bb verify said no), ProverCrashed (signal, unusable output) or
        ProverUnavailable. Steps: the VK, `bb prove` on the private copy of the circuit, its
        exit status and stderr, its output files checked against the VK, `bb verify`.
        """
        code, _ = self._prove(witness_path, workdir, keep_fds, threads)
        try:
            proof = read_proof(workdir, code)
            self.check_proof(proof)
        except BBExited as exc:
            raise messages.on_full_disk(exc, workdir) from None
        if self.verify_proofs and not self.verify(os.path.join(workdir, "proof"),
                                                  os.path.join(workdir, "public_inputs")):
            raise ProofRejected(code, "proof failed verification: bb verify rejects the proof bb prove wrote")
        return proof

    def self_check(self, workdir, keep_fds=(), threads=None):
        """Tell a fault of ours from a client's bad input with runs no client controls; return None
        when they pass, else raise the ProverError of the failure. workdir: an empty directory.

        1. The VK computed again must be the cached one (VerificationKey.matches: the CRS and bb
           are what every proof needs, and a changed CRS makes proofs that never verify).
        2. The server's own witness (acir.zero_witness: every value 0) must prove: bb runs to the
           end with a proof of the right shape, or rejects that witness for its values (it rarely
           satisfies the circuit, so its proof is not verified). Skipped without a decodable circuit.
        """
        self.vk.ensure(threads)
        check_dir = os.path.join(workdir, "vk")
        try:
            os.mkdir(check_dir, 0o700)
        except OSError as exc:
            raise ResourceUnavailable(None, f"cannot write the self-check's files: {exc.strerror}") from None
        self.vk.matches(check_dir, keep_fds, threads)
        if self.acir is None:
            return
        witness_path = os.path.join(workdir, "self-check.witness.gz")
        try:
            with open(os.open(witness_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "wb") as f:
                f.write(acir.zero_witness(self.acir))
        except OSError as exc:
            raise ResourceUnavailable(None, f"cannot write the self-check witness: {exc.strerror}") from None
        try:
            code, _ = self._prove(witness_path, workdir, keep_fds, threads)
            self.check_proof(read_proof(workdir, code))
        except ProverFailed:
            return
        except BBExited as exc:
            raise messages.on_full_disk(exc, workdir) from None

    def _prove(self, witness_path, workdir, keep_fds, threads):
        """`bb prove` into `workdir`; return (exit status, stderr) of a run that wrote a proof."""
        vk = self.vk.ensure(threads)
        program = os.path.join(os.path.dirname(vk), CIRCUIT_FILE)
        code, _, err = self.bb.run("prove", "-b", program, "-w", witness_path, "-k", vk, "-o", workdir,
                                   scratch=workdir, keep_fds=keep_fds, threads=threads)
        if code != 0 or messages.UNSATISFIED in err:
            error = messages.bb_error(code, err, (workdir, witness_path, program, vk, self.bb.crs_dir or ""))
            raise messages.on_full_disk(error, workdir)
        return code, err

    def proof_shape(self):
        """The ProofShape of this circuit's proofs, from its VK; raises ProverError when it cannot be read."""
        vk, _ = self.vk.read()
        try:
            log_n = formats.vk_log_circuit_size(vk)
        except ValueError as exc:
            raise ProverCrashed(0, f"the verification key is unusable: {exc}") from None
        total = formats.vk_public_inputs(vk)
        own = None if self._rollup() else total - formats.PAIRING_POINT_FIELDS
        return ProofShape(formats.proof_bytes(self.bb.verifier_target, log_n), own, total)

    def check_proof(self, proof):
        """Check a Proof's length and number of public inputs against the VK; ProverCrashed if off."""
        shape = self.proof_shape()
        if shape.public_inputs is not None and len(proof.public_inputs) != shape.public_inputs:
            raise ProverCrashed(0, f"bb wrote {len(proof.public_inputs)} public inputs; the VK says "
                                   f"{shape.public_inputs}")
        size = shape.proof_bytes
        if not proof.proof or len(proof.proof) % formats.FIELD_BYTES or (size and len(proof.proof) != size):
            expected = f"{size}" if size else "a whole number of 32-byte fields"
            raise ProverCrashed(0, f"bb wrote a proof of {len(proof.proof)} bytes; this VK's proofs are {expected}")

    # -- verifying

    def verify(self, proof_path, public_inputs_path):
        """`bb verify` a proof with this circuit's VK: True if bb accepts it, False if it rejects it.

        proof_path: an UltraHonk proof as `bb prove` writes it (whole 32-byte field elements).
        public_inputs_path: 32-byte big-endian field elements, bb's `public_inputs` format.
        Raises ProverTimeout (after verify_timeout seconds), ProverUnavailable, or a BBExited
        subclass when bb fails for a reason other than the proof (messages.verify_verdict).
        """
        vk = self.vk.ensure()
        code, _, err = self.bb.run("verify", "-k", vk, "-p", proof_path, "-i", public_inputs_path,
                                   timeout=self.verify_timeout)
        return messages.verify_verdict(code, err)


def read_proof(workdir, returncode=0):
    """Read bb's `proof` and `public_inputs` from `workdir` into a Proof; ProverCrashed if unusable."""
    try:
        with open(os.path.join(workdir, "proof"), "rb") as f:
            proof = f.read()
        with open(os.path.join(workdir, "public_inputs"), "rb") as f:
            public_inputs = formats.parse_public_inputs(f.read())
    except (OSError, ValueError) as exc:
        raise ProverCrashed(returncode, f"bb exited 0 without usable output: {exc}") from None
    return Proof(proof, public_inputs)
