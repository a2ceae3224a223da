/**
 * The pairing code that moves an account to a new device, as the Rust client's `pairing`
 * module: `LOCKSTEP1:` + base64url of `{"server","ticket","key"}`. The key never passes
 * through the server: the code goes from screen to camera (or clipboard).
 */
import { fromBase64Url, fromUtf8, toBase64Url, utf8 } from './bytes.js';
import { AccountKey } from './crypto.js';

const PREFIX = 'LOCKSTEP1:';

export class PairingCodeError extends Error {
  constructor(reason: string) {
    super(`not a Lockstep pairing code (${reason}); copy the whole text shown by \`lockstep-cli pair show\``);
    this.name = 'PairingCodeError';
  }
}

export interface PairingCode {
  server: string;
  ticket: string;
  key: AccountKey;
}

export function encodePairingCode(code: PairingCode): string {
  const json = JSON.stringify({ server: code.server, ticket: code.ticket, key: code.key.toBase64() });
  return PREFIX + toBase64Url(utf8(json));
}

/** The code, alone or as the one line that holds it in what `pair show` printed (or a scanned QR code). */
export function decodePairingCode(text: string): PairingCode {
  const line = text
    .split(/\r?\n/)
    .map((part) => part.trim())
    .find((part) => part.startsWith(PREFIX)) ?? text.trim();
  if (!line.startsWith(PREFIX)) throw new PairingCodeError('it does not start with LOCKSTEP1:');
  let json: string;
  try {
    json = fromUtf8(fromBase64Url(line.slice(PREFIX.length)));
  } catch {
    throw new PairingCodeError('bad base64');
  }
  let wire: unknown;
  try {
    wire = JSON.parse(json);
  } catch {
    throw new PairingCodeError('bad content');
  }
  if (typeof wire !== 'object' || wire === null) throw new PairingCodeError('bad content');
  const { server, ticket, key } = wire as Record<string, unknown>;
  if (typeof server !== 'string' || typeof ticket !== 'string' || typeof key !== 'string') {
    throw new PairingCodeError('bad content');
  }
  let accountKey: AccountKey;
  try {
    accountKey = AccountKey.fromBase64(key);
  } catch {
    throw new PairingCodeError('bad key');
  }
  return { server, ticket, key: accountKey };
}
