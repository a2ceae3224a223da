/**
 * Builds the PWA into `dist/pwa/`: the page's script and the service worker bundled by esbuild
 * (the package and its dependencies inlined, so the static files need no `node_modules`), and
 * the static files copied. `npm run build` runs it after `tsc` (which type-checks `app/`).
 */
import { copyFileSync, mkdirSync, readdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { build } from 'esbuild';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const out = join(root, 'dist', 'pwa');
mkdirSync(out, { recursive: true });
await build({
  entryPoints: { app: join(root, 'app', 'main.ts'), sw: join(root, 'app', 'sw.ts') },
  outdir: out,
  bundle: true,
  format: 'esm',
  target: 'es2022',
  sourcemap: true,
  logLevel: 'warning',
});
for (const name of readdirSync(join(root, 'app'))) {
  if (!name.endsWith('.ts')) copyFileSync(join(root, 'app', name), join(out, name));
}
console.log(`the PWA is in ${out}`);
