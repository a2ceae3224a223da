/** The PWA's scanner (`app/scan.ts`) where Node can run it: what a failed camera means in words. */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import { ScanError, cameraProblem, scanPairingCode } from '../app/scan.js';

describe('scanning the pairing QR code', () => {
  it('says why the camera did not start, and to paste the code instead', () => {
    const named = (name: string) => Object.assign(new Error('from the browser'), { name });
    assert.match(cameraProblem(named('NotAllowedError')), /not allowed.*paste the code instead/);
    assert.match(cameraProblem(named('NotFoundError')), /No camera was found.*paste the code instead/);
    assert.match(cameraProblem(named('NotReadableError')), /busy.*paste the code instead/);
    assert.match(cameraProblem(named('TypeError')), /could not start \(from the browser\).*paste the code instead/);
  });

  it('without a camera API (no secure context) refuses at once with words', async () => {
    const video = {} as HTMLVideoElement;
    const stubbed = typeof navigator !== 'undefined';
    const saved = stubbed ? Object.getOwnPropertyDescriptor(globalThis, 'navigator') : undefined;
    if (stubbed) Object.defineProperty(globalThis, 'navigator', { value: {}, configurable: true });
    try {
      await assert.rejects(
        scanPairingCode(video, new AbortController().signal),
        (error: unknown) => error instanceof ScanError && /HTTPS or from localhost.*paste the code instead/.test(error.message),
      );
    } finally {
      if (saved) Object.defineProperty(globalThis, 'navigator', saved);
    }
  });
});
