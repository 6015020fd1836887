// Compile the benchmark circuit bench/circuits/hashchain at chain lengths N and execute one
// witness for each, with the pinned toolchain (same as fixtures.mjs).
// Usage: node tools/noir/bench.mjs OUT_DIR N [N ...]
// Writes OUT_DIR/hashchain-N/{circuit.json, witness.gz, meta.json} for each N; meta.json holds
// N, the input and the public return value the proof must carry. The output does not
// depend on where the checkout lives, so committed sizes can be checked byte for byte.
import { cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { compileProgram, executeProgram } from './noir.mjs';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const source = resolve(root, 'bench', 'circuits', 'hashchain');
const SEED = '7';

const [outArg, ...sizes] = process.argv.slice(2);
if (!outArg || sizes.length === 0 || sizes.some((n) => !/^[1-9][0-9]*$/.test(n))) {
  console.error('usage: node tools/noir/bench.mjs OUT_DIR N [N ...]   (N: chain length, a positive integer)');
  process.exit(2);
}
const out = resolve(outArg);

const main = readFileSync(join(source, 'src', 'main.nr'), 'utf8');
const GLOBAL_N = /^global N: u32 = \d+;$/m;
if (!GLOBAL_N.test(main)) throw new Error(`${source}/src/main.nr has no "global N: u32 = <n>;" line`);

const scratch = mkdtempSync(join(tmpdir(), 'bb-bench-noir-'));
try {
  for (const n of sizes) {
    const project = join(scratch, `hashchain-${n}`);
    cpSync(source, project, { recursive: true });
    writeFileSync(join(project, 'src', 'main.nr'), main.replace(GLOBAL_N, `global N: u32 = ${n};`));
    const program = await compileProgram(project);
    const inputs = { seed: SEED };
    const { witness, returnValue } = await executeProgram(program, inputs);
    const dir = join(out, `hashchain-${n}`);
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, 'circuit.json'), JSON.stringify(program) + '\n');
    writeFileSync(join(dir, 'witness.gz'), witness);
    const meta = { circuit: 'hashchain', n: Number(n), inputs, public_inputs: [returnValue],
      noir_version: program.noir_version };
    writeFileSync(join(dir, 'meta.json'), JSON.stringify(meta, null, 2) + '\n');
    console.log(`wrote ${dir} (witness ${witness.length} bytes)`);
  }
} finally {
  rmSync(scratch, { recursive: true, force: true });
}
