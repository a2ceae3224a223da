/**
 * Scans the `LOCKSTEP1:` pairing code from the QR code `lockstep-cli pair show` draws: the
 * camera through getUserMedia, frames decoded by the browser's own `BarcodeDetector` where it
 * has one for QR codes, else by `jsQR` (a maintained pure-JavaScript decoder, bundled with the
 * app so scanning works offline). When there is no camera or no permission, the error says so
 * in plain words and what to do instead (paste the code).
 */
import jsQRModule from 'jsqr';

type Decode = (data: Uint8ClampedArray, width: number, height: number) => { data: string } | null;
// jsqr is CommonJS: the bundler hands its function over as the default export, Node as `.default`.
const jsQR: Decode =
  (jsQRModule as unknown as { default?: Decode }).default ?? (jsQRModule as unknown as Decode);

/** The text of a QR code in an RGBA frame (as a canvas gives it), decoded by jsQR; null if none. */
export function decodeQrFrame(rgba: Uint8ClampedArray, width: number, height: number): string | null {
  return jsQR(rgba, width, height)?.data ?? null;
}

/** A scan that could not go on, with words for the person holding the camera. */
export class ScanError extends Error {
  override name = 'ScanError';
}

/** What a failed getUserMedia means to the person, and what to do instead. */
export function cameraProblem(error: unknown): string {
  const name = error instanceof Error || (typeof DOMException !== 'undefined' && error instanceof DOMException) ? error.name : '';
  switch (name) {
    case 'NotAllowedError':
    case 'SecurityError':
      return 'The camera is not allowed for this page: allow it in the browser’s site settings and scan again, or paste the code instead.';
    case 'NotFoundError':
    case 'OverconstrainedError':
      return 'No camera was found on this device: paste the code instead.';
    case 'NotReadableError':
    case 'AbortError':
      return 'The camera is busy or could not start (another app may be using it): close that app and scan again, or paste the code instead.';
    default:
      return `The camera could not start (${error instanceof Error ? error.message : String(error)}): paste the code instead.`;
  }
}

interface Detector {
  detect(source: CanvasImageSource): Promise<{ rawValue: string }[]>;
}

/** The browser's BarcodeDetector when it reads QR codes (Chrome on Android and macOS, Safari), else null. */
async function nativeDetector(): Promise<Detector | null> {
  const BarcodeDetector = (globalThis as unknown as {
    BarcodeDetector?: { new (options: { formats: string[] }): Detector; getSupportedFormats(): Promise<string[]> };
  }).BarcodeDetector;
  if (!BarcodeDetector) return null;
  try {
    return (await BarcodeDetector.getSupportedFormats()).includes('qr_code') ? new BarcodeDetector({ formats: ['qr_code'] }) : null;
  } catch {
    return null;
  }
}

/**
 * Shows the camera in `video` and resolves with the first QR code that holds a pairing code;
 * `onNotice` hears about QR codes that do not. Stops the camera when done, failed or aborted.
 */
export async function scanPairingCode(
  video: HTMLVideoElement,
  signal: AbortSignal,
  onNotice: (message: string) => void = () => undefined,
): Promise<string> {
  if (typeof navigator === 'undefined' || !navigator.mediaDevices?.getUserMedia) {
    throw new ScanError(
      'This browser offers no camera to this page (a camera needs a page served over HTTPS or from localhost): paste the code instead.',
    );
  }
  let stream: MediaStream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: 'environment' }, audio: false });
  } catch (error) {
    throw new ScanError(cameraProblem(error));
  }
  try {
    video.muted = true;
    video.playsInline = true;
    video.srcObject = stream;
    await video.play();
    let detector = await nativeDetector();
    const canvas = document.createElement('canvas');
    const context = canvas.getContext('2d', { willReadFrequently: true });
    if (!context) throw new ScanError('This browser cannot read camera frames here: paste the code instead.');
    while (!signal.aborted) {
      await new Promise((resolve) => setTimeout(resolve, 120));
      if (video.readyState < HTMLMediaElement.HAVE_CURRENT_DATA || !video.videoWidth) continue;
      let texts: string[] = [];
      if (detector) {
        try {
          texts = (await detector.detect(video)).map((code) => code.rawValue);
        } catch {
          detector = null; // e.g. a detector without a backend on this platform: decode in JavaScript
        }
      }
      if (!detector) {
        canvas.width = video.videoWidth;
        canvas.height = video.videoHeight;
        context.drawImage(video, 0, 0);
        const found = decodeQrFrame(context.getImageData(0, 0, canvas.width, canvas.height).data, canvas.width, canvas.height);
        if (found !== null) texts = [found];
      }
      const code = texts.find((text) => text.includes('LOCKSTEP1:'));
      if (code) return code;
      if (texts.length) onNotice('That QR code is not a Lockstep pairing code: show the one `lockstep-cli pair show` draws.');
    }
    throw new ScanError('Scanning stopped.');
  } finally {
    for (const track of stream.getTracks()) track.stop();
    video.srcObject = null;
  }
}
