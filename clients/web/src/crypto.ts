/**
 * Envelope encryption, as the Rust client's `crypto` module: one random 32-byte account key
 * per user; epoch 1's subkey is `HKDF-SHA256(salt = "lockstep.v1 account key", account key,
 * info = "lockstep.v1 epoch" ‖ u32be(1))`; changes are sealed with XChaCha20-Poly1305 (random
 * 24-byte nonces) and associated data that binds the ciphertext to user, record, collection,
 * op and epoch. Primitives from @noble (audited), never hand-written.
 */
import { xchacha20poly1305 } from '@noble/ciphers/chacha.js';
import { hkdf } from '@noble/hashes/hkdf.js';
import { sha256 } from '@noble/hashes/sha2.js';
import { randomBytes } from '@noble/hashes/utils.js';

import { concat, fromBase64Url, i32be, toBase64Url, u32be, utf8 } from './bytes.js';

export const NONCE_BYTES = 24;
export const KEY_BYTES = 32;
const HKDF_SALT = utf8('lockstep.v1 account key');
const AAD_TAG = utf8('lockstep.v1 change');
const EPOCH_INFO = utf8('lockstep.v1 epoch');

export type CryptoErrorKind =
  | 'decrypt'
  | 'nonce'
  | 'key-format'
  | 'no-epoch-key'
  | 'sealed-key'
  | 'device-proof'
  | 'public-key';

const MESSAGES: Record<CryptoErrorKind, string> = {
  decrypt: "the ciphertext does not decrypt with this account's key (tampered, moved, or another key)",
  nonce: `a nonce must have ${NONCE_BYTES} bytes`,
  'key-format': 'an account key is 32 bytes in base64url; this one is not',
  'no-epoch-key': 'this device has no key for this key epoch (yet): another device of the account must share it',
  'sealed-key': "a sealed epoch key does not open with this device's key, or its proof does not verify",
  'device-proof': 'device key proof does not verify: the key was not registered by a holder of the account key',
  'public-key': 'a device public key must be 32 bytes and not of low order',
};

export class CryptoError extends Error {
  readonly kind: CryptoErrorKind;

  constructor(kind: CryptoErrorKind, detail?: string) {
    super(detail ? `${MESSAGES[kind]} (${detail})` : MESSAGES[kind]);
    this.name = 'CryptoError';
    this.kind = kind;
  }
}

/** The proto's `Op`: 1 upsert, 2 delete. */
export const Op = { Upsert: 1, Delete: 2 } as const;

/** What a ciphertext is bound to. */
export interface Binding {
  userId: string;
  recordId: string;
  collection: string;
  /** 1 for an upsert, 2 for a delete (the proto's `Op`). */
  op: number;
  keyEpoch: number;
}

/** `"lockstep.v1 change"`, then user, record and collection length-prefixed, then op (i32be) and epoch (u32be). */
export function associatedData(binding: Binding): Uint8Array {
  const parts = [binding.userId, binding.recordId, binding.collection].flatMap((part) => {
    const bytes = utf8(part);
    return [u32be(bytes.length), bytes];
  });
  return concat(AAD_TAG, ...parts, i32be(binding.op), u32be(binding.keyEpoch));
}

export function epochInfo(epoch: number): Uint8Array {
  return concat(EPOCH_INFO, u32be(epoch));
}

export function checkKeyBytes(bytes: Uint8Array): Uint8Array {
  if (bytes.length !== KEY_BYTES) throw new CryptoError('key-format');
  return bytes;
}

/** Seals with a 32-byte subkey; `nonce` is random unless given (tests and vectors only). */
export function sealWith(
  subkey: Uint8Array,
  binding: Binding,
  plaintext: Uint8Array,
  nonce: Uint8Array = randomBytes(NONCE_BYTES),
): { nonce: Uint8Array; ciphertext: Uint8Array } {
  if (nonce.length !== NONCE_BYTES) throw new CryptoError('nonce', `${nonce.length} bytes`);
  const ciphertext = xchacha20poly1305(subkey, nonce, associatedData(binding)).encrypt(plaintext);
  return { nonce, ciphertext };
}

export function openWith(subkey: Uint8Array, binding: Binding, nonce: Uint8Array, ciphertext: Uint8Array): Uint8Array {
  if (nonce.length !== NONCE_BYTES) throw new CryptoError('nonce', `${nonce.length} bytes`);
  try {
    return xchacha20poly1305(subkey, nonce, associatedData(binding)).decrypt(ciphertext);
  } catch {
    throw new CryptoError('decrypt');
  }
}

/** The account key. Its bytes are not enumerable and not printed. */
export class AccountKey {
  readonly #bytes: Uint8Array;

  private constructor(bytes: Uint8Array) {
    this.#bytes = Uint8Array.from(checkKeyBytes(bytes));
  }

  static generate(): AccountKey {
    return new AccountKey(randomBytes(KEY_BYTES));
  }

  static fromBytes(bytes: Uint8Array): AccountKey {
    return new AccountKey(bytes);
  }

  static fromBase64(text: string): AccountKey {
    let bytes: Uint8Array;
    try {
      bytes = fromBase64Url(text.trim());
    } catch {
      throw new CryptoError('key-format');
    }
    return new AccountKey(bytes);
  }

  /** The key as text, for pairing and the local store only. */
  toBase64(): string {
    return toBase64Url(this.#bytes);
  }

  equals(other: AccountKey): boolean {
    return this.toBase64() === other.toBase64();
  }

  /** A MAC key for `label` (proofs that a device or epoch key comes from a holder of the account key). */
  macKey(label: Uint8Array): Uint8Array {
    return hkdf(sha256, this.#bytes, HKDF_SALT, label, 32);
  }

  /** The subkey of `epoch` derived from the account key (only epoch 1 uses it). */
  epochSubkey(epoch: number): Uint8Array {
    return hkdf(sha256, this.#bytes, HKDF_SALT, epochInfo(epoch), 32);
  }

  seal(binding: Binding, plaintext: Uint8Array, nonce?: Uint8Array): { nonce: Uint8Array; ciphertext: Uint8Array } {
    return sealWith(this.epochSubkey(binding.keyEpoch), binding, plaintext, nonce);
  }

  open(binding: Binding, nonce: Uint8Array, ciphertext: Uint8Array): Uint8Array {
    return openWith(this.epochSubkey(binding.keyEpoch), binding, nonce, ciphertext);
  }

  toString(): string {
    return 'AccountKey(<hidden>)';
  }

  toJSON(): string {
    return 'AccountKey(<hidden>)';
  }
}
