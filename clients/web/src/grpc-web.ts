/**
 * gRPC-Web's framing, for the transport that calls the server from a browser (`fetch` with a
 * streaming body reader): each message is a frame of a flag byte (0x00), a 4-byte big-endian
 * length and the protobuf bytes; the trailers come last as a frame with flag 0x80 holding
 * `name: value` lines. A call refused before any message (no token, rate limited) is answered
 * "trailers-only": `grpc-status` in the HTTP headers and no frame.
 */
import { concat, fromUtf8, u32be } from './bytes.js';

export const CONTENT_TYPE = 'application/grpc-web+proto';
const TRAILERS_FLAG = 0x80;

/** The gRPC status codes a client acts on (the rest are errors to show). */
export const GrpcStatus = {
  Ok: 0,
  Cancelled: 1,
  Unknown: 2,
  InvalidArgument: 3,
  DeadlineExceeded: 4,
  NotFound: 5,
  AlreadyExists: 6,
  PermissionDenied: 7,
  ResourceExhausted: 8,
  FailedPrecondition: 9,
  Aborted: 10,
  OutOfRange: 11,
  Unimplemented: 12,
  Internal: 13,
  Unavailable: 14,
  DataLoss: 15,
  Unauthenticated: 16,
} as const;

/** One message as a gRPC-Web frame (uncompressed). */
export function frame(message: Uint8Array): Uint8Array {
  return concat(new Uint8Array([0]), u32be(message.length), message);
}

export type Frame = { kind: 'message'; message: Uint8Array } | { kind: 'trailers'; trailers: Map<string, string> };

/** `name: value` lines (a trailers frame, or HTTP headers), names lowercased. */
export function parseTrailers(text: string): Map<string, string> {
  const trailers = new Map<string, string>();
  for (const line of text.split('\r\n')) {
    const colon = line.indexOf(':');
    if (colon > 0) trailers.set(line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim());
  }
  return trailers;
}

/** Splits a response body into frames as its chunks arrive, whatever their boundaries. */
export class FrameReader {
  #buffer: Uint8Array = new Uint8Array(0);

  constructor(private readonly maxMessageBytes: number = 16 * 1024 * 1024) {}

  /** The frames completed by `chunk`. */
  push(chunk: Uint8Array): Frame[] {
    this.#buffer = concat(this.#buffer, chunk);
    const frames: Frame[] = [];
    while (this.#buffer.length >= 5) {
      const flag = this.#buffer[0]!;
      const length = new DataView(this.#buffer.buffer, this.#buffer.byteOffset + 1, 4).getUint32(0);
      if (length > this.maxMessageBytes) throw new Error(`a gRPC-Web frame of ${length} bytes is over the limit`);
      if (this.#buffer.length < 5 + length) break;
      const payload = this.#buffer.slice(5, 5 + length);
      this.#buffer = this.#buffer.slice(5 + length);
      if (flag & TRAILERS_FLAG) {
        frames.push({ kind: 'trailers', trailers: parseTrailers(fromUtf8(payload)) });
      } else if (flag === 0) {
        frames.push({ kind: 'message', message: payload });
      } else {
        throw new Error(`a compressed gRPC-Web frame (flag ${flag}) was not asked for`);
      }
    }
    return frames;
  }

  /** Whether the body ended between frames (a body cut inside a frame is an error). */
  atFrameBoundary(): boolean {
    return this.#buffer.length === 0;
  }
}

/** The status of a call: from its trailers frame, else from the HTTP headers (trailers-only). */
export function callStatus(
  trailers: Map<string, string> | undefined,
  headers: { get(name: string): string | null },
): { code: number; message: string } | null {
  const status = trailers?.get('grpc-status') ?? headers.get('grpc-status');
  if (status === undefined || status === null) return null;
  const message = trailers?.get('grpc-message') ?? headers.get('grpc-message') ?? '';
  let decoded = message;
  try {
    decoded = decodeURIComponent(message);
  } catch {
    // Not percent-encoded after all: shown as sent.
  }
  return { code: Number(status), message: decoded };
}
