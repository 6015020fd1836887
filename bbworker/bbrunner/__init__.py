"""The prover layer: run the Barretenberg CLI (`bb`) on Noir circuits. It knows nothing of HTTP.

    bb.BB               the binary: status, version, one run with the server-wide options
    circuit.Circuit     one circuit: its VK (vk.py), proofs, verification, readiness problems
    process             one bb process: fixed argv, own process group, limits, killed on every path
    messages            bb's stderr -> the error raised (bbworker.errors), in one table
    formats, acir       what is read of bb's files (CRS, VK, proofs) and of Noir's (ACIR, witness)

Formats are those of bb 5.0.0 (npm @aztec/bb.js 5.0.0) and Noir 1.0.0-beta.26.
"""
from bbworker.bbrunner.bb import BB, Status, describe_elf
from bbworker.bbrunner.circuit import Circuit, Proof

__all__ = ["BB", "Circuit", "Proof", "Status", "describe_elf"]
