/**
 * Revocations as the log says them, as the Rust client's `store::revocations`: revoking a
 * device writes a **control record** in the reserved collection `_lockstep.revocations`, id
 * `revoked:<device id>`, fields `device_id`, `public_key` (URL-safe base64 without padding of
 * the X25519 key the device registered, `""` if none) and `revoked_in_epoch` (the newest
 * epoch it may hold). It is sealed like any change, so the server can neither read nor forge
 * it. Every device refuses to seal epoch keys to a device it names (by id or by key), and
 * starts an epoch after `revoked_in_epoch` when none exists yet, whatever the server says.
 */
import { fromBase64Url, toBase64Url } from './bytes.js';
import type { JsonValue } from './json.js';

export const REVOCATIONS_COLLECTION = '_lockstep.revocations';

/** A device the account revoked, as its control record says. */
export interface RevokedDevice {
  deviceId: string;
  /** The key it registered (empty if none). */
  publicKey: Uint8Array;
  /** The newest epoch it may hold: an epoch after it must exist. */
  revokedInEpoch: number;
}

export function revocationRecordId(deviceId: string): string {
  return `revoked:${deviceId}`;
}

/** The control record's fields, as Rust writes them. */
export function revocationFields(revoked: RevokedDevice): { [name: string]: JsonValue } {
  return {
    device_id: revoked.deviceId,
    public_key: toBase64Url(revoked.publicKey),
    revoked_in_epoch: revoked.revokedInEpoch,
  };
}

/** Reads a control record's fields; null if it is not one. */
export function readRevocation(fields: { [name: string]: JsonValue | undefined }): RevokedDevice | null {
  const { device_id: deviceId, public_key: publicKeyText, revoked_in_epoch: epoch } = fields;
  if (typeof deviceId !== 'string' || !deviceId || typeof publicKeyText !== 'string') return null;
  let publicKey: Uint8Array;
  try {
    publicKey = fromBase64Url(publicKeyText);
  } catch {
    return null;
  }
  if (publicKey.length !== 0 && publicKey.length !== 32) return null;
  const revokedInEpoch = typeof epoch === 'bigint' ? Number(epoch) : epoch;
  if (typeof revokedInEpoch !== 'number' || !Number.isInteger(revokedInEpoch) || revokedInEpoch < 0 || revokedInEpoch > 0xffff_ffff) {
    return null;
  }
  return { deviceId, publicKey, revokedInEpoch };
}

/** Adds `more` to `known`, which only grows: the higher epoch and any key are kept. */
export function mergeRevocations(known: RevokedDevice[], more: RevokedDevice[]): RevokedDevice[] {
  const byId = new Map(known.map((revoked) => [revoked.deviceId, { ...revoked }]));
  for (const revoked of more) {
    const held = byId.get(revoked.deviceId);
    if (!held) byId.set(revoked.deviceId, { ...revoked });
    else {
      if (held.publicKey.length === 0) held.publicKey = revoked.publicKey;
      held.revokedInEpoch = Math.max(held.revokedInEpoch, revoked.revokedInEpoch);
    }
  }
  return [...byId.values()].sort((a, b) => (a.deviceId < b.deviceId ? -1 : a.deviceId > b.deviceId ? 1 : 0));
}

/** Whether a device is revoked, by its id or by its public key (a revoked key registered again under another id is refused too). */
export function isRevoked(known: RevokedDevice[], deviceId: string, publicKey: Uint8Array): boolean {
  const key = publicKey.length ? toBase64Url(publicKey) : null;
  return known.some((revoked) => revoked.deviceId === deviceId || (key !== null && revoked.publicKey.length > 0 && toBase64Url(revoked.publicKey) === key));
}
