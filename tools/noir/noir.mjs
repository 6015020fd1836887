// Compile Noir circuits and execute them to gzipped witnesses with the pinned
// toolchain (@noir-lang/noir_wasm + @noir-lang/noir_js 1.0.0-beta.26, matching bb 5.0.0).
import { compile, createFileManager } from '@noir-lang/noir_wasm';
import { Noir, acvm } from '@noir-lang/noir_js';

// Compile the Nargo project in `dir`; returns the program artifact as nargo writes it
// (noir_version, hash, abi, bytecode, debug_symbols, file_map), with file paths made
// relative so the output does not depend on where the checkout lives.
export async function compileProgram(dir) {
  const fm = createFileManager(dir);
  const { program } = await compile(fm);
  const fileMap = {};
  for (const [id, entry] of Object.entries(program.file_map ?? {})) {
    fileMap[id] = { ...entry, path: entry.path.startsWith(dir) ? entry.path.slice(dir.length).replace(/^\/+/, '') : entry.path };
  }
  return { ...program, file_map: fileMap };
}

// Execute `program` on `inputs`; returns the gzipped witness stack (Uint8Array), byte for
// byte what `noir.execute()` gives a browser client, and the return value.
export async function executeProgram(program, inputs) {
  const noir = new Noir(program);
  const { witness, returnValue } = await noir.execute(inputs);
  return { witness, returnValue };
}

// Add one to every witness of the first circuit in a gzipped witness stack whose value is
// `value` (a 0x-hex field element, e.g. the public return value), so the witness stays
// well-formed but no longer satisfies the circuit. Throws when no witness has that value.
export function tamperWitness(gz, value) {
  const stack = acvm.decompressWitnessStack(gz);
  const map = stack[0].witness;
  const target = BigInt(value);
  let changed = 0;
  for (const [index, v] of map) {
    if (BigInt(v) === target) {
      map.set(index, '0x' + (target + 1n).toString(16).padStart(64, '0'));
      changed += 1;
    }
  }
  if (changed === 0) throw new Error(`no witness has the value ${value}`);
  return acvm.compressWitnessStack(stack);
}
