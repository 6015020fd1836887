// Regenerate circuit.json and tests/fixtures/ from circuits/ (byte for byte).
// Usage: node tools/noir/fixtures.mjs [OUT_ROOT]   (or: make fixtures)
// OUT_ROOT defaults to the project root; the tests pass a temp dir to check that
// the committed files are reproduced byte for byte.
import { writeFileSync, mkdirSync } from 'node:fs';
import { resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { compileProgram, executeProgram, tamperWitness } from './noir.mjs';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const outRoot = process.argv[2] ? resolve(process.argv[2]) : root;
const out = resolve(outRoot, 'tests', 'fixtures');
mkdirSync(out, { recursive: true });

const write = (path, data) => {
  writeFileSync(path, data);
  console.log(`wrote ${path} (${data.length} bytes)`);
};

const demo = await compileProgram(resolve(root, 'circuits', 'demo'));
write(resolve(outRoot, 'circuit.json'), JSON.stringify(demo) + '\n');

const VALID = [
  { preimage: ['1', '2', '3', '4'], salt: '42' },
  { preimage: ['0', '0', '0', '0'], salt: '0' },
  { preimage: ['18446744073709551615', '123456789', '987654321', '7'], salt: '4294967295' },
];
const expected = {};
for (const [i, inputs] of VALID.entries()) {
  const { witness, returnValue } = await executeProgram(demo, inputs);
  write(resolve(out, `valid_${i + 1}.gz`), witness);
  expected[`valid_${i + 1}.gz`] = { inputs, public_inputs: [returnValue] };
}

// Well-formed witness whose public output (the hash) is off by one: bb must reject it.
const { witness: good, returnValue } = await executeProgram(demo, VALID[0]);
write(resolve(out, 'unsatisfied.gz'), tamperWitness(good, returnValue));

// A valid witness for a different circuit.
const other = await compileProgram(resolve(root, 'circuits', 'other'));
write(resolve(out, 'other_circuit.json'), JSON.stringify(other) + '\n');
const { witness: otherWitness, returnValue: otherValue } = await executeProgram(other, { a: '3', b: '5' });
write(resolve(out, 'other_circuit.gz'), otherWitness);
expected['other_circuit.gz'] = { inputs: { a: '3', b: '5' }, public_inputs: [otherValue] };

write(resolve(out, 'expected.json'), JSON.stringify(expected, null, 2) + '\n');
