/**
 * Key epochs and device key pairs, as the Rust client's `epochs` module: every device has an
 * X25519 key pair whose public half is registered with a proof (HMAC keyed from the account
 * key); revoking a device starts a new epoch whose random key is sealed to each remaining
 * device (X25519 with a fresh ephemeral key, HKDF-SHA256, XChaCha20-Poly1305, bound to user,
 * recipient device and epoch, carrying a proof keyed from the account key).
 */
import { xchacha20poly1305 } from '@noble/ciphers/chacha.js';
import { equalBytes } from '@noble/ciphers/utils.js';
import { x25519 } from '@noble/curves/ed25519.js';
import { hkdf } from '@noble/hashes/hkdf.js';
import { hmac } from '@noble/hashes/hmac.js';
import { sha256 } from '@noble/hashes/sha2.js';
import { randomBytes } from '@noble/hashes/utils.js';

import { concat, fromBase64Url, lengthPrefixed, toBase64Url, u32be, utf8 } from './bytes.js';
import {
  AccountKey,
  type Binding,
  CryptoError,
  KEY_BYTES,
  NONCE_BYTES,
  checkKeyBytes,
  epochInfo,
  openWith,
  sealWith,
} from './crypto.js';

export const PUBLIC_KEY_BYTES = 32;
export const PROOF_BYTES = 32;
/** Ephemeral public key ‖ nonce ‖ ciphertext of (epoch key ‖ proof) ‖ tag. */
export const SEALED_KEY_BYTES = PUBLIC_KEY_BYTES + NONCE_BYTES + 32 + PROOF_BYTES + 16;

const DEVICE_PROOF_LABEL = utf8('lockstep.v1 device key proof');
const EPOCH_PROOF_LABEL = utf8('lockstep.v1 epoch key proof');
const SEALED_KEY_LABEL = utf8('lockstep.v1 sealed epoch key');
const EPOCH_KEY_SALT = utf8('lockstep.v1 epoch key');

function mac(key: Uint8Array, parts: Uint8Array[]): Uint8Array {
  return hmac(sha256, key, lengthPrefixed(parts));
}

function decodeKey(text: string): Uint8Array {
  try {
    return checkKeyBytes(fromBase64Url(text.trim()));
  } catch {
    throw new CryptoError('key-format');
  }
}

/** This device's X25519 private key. */
export class DeviceSecret {
  readonly #bytes: Uint8Array;

  private constructor(bytes: Uint8Array) {
    this.#bytes = Uint8Array.from(checkKeyBytes(bytes));
  }

  static generate(): DeviceSecret {
    return new DeviceSecret(randomBytes(KEY_BYTES));
  }

  static fromBase64(text: string): DeviceSecret {
    return new DeviceSecret(decodeKey(text));
  }

  publicKey(): Uint8Array {
    return x25519.getPublicKey(this.#bytes);
  }

  /** For the local store only. */
  toBase64(): string {
    return toBase64Url(this.#bytes);
  }

  /** X25519 with `publicKey`; throws on a low-order point (no contribution). */
  sharedSecret(publicKey: Uint8Array): Uint8Array {
    return x25519.getSharedSecret(this.#bytes, publicKey);
  }

  toString(): string {
    return 'DeviceSecret(<hidden>)';
  }

  toJSON(): string {
    return 'DeviceSecret(<hidden>)';
  }
}

/** The proof sent with a device's public key. */
export function deviceKeyProof(account: AccountKey, userId: string, deviceId: string, publicKey: Uint8Array): Uint8Array {
  return mac(account.macKey(DEVICE_PROOF_LABEL), [utf8(userId), utf8(deviceId), publicKey]);
}

/** Checks a listed device's public key and proof before anything is sealed to it. */
export function verifyDeviceKey(
  account: AccountKey,
  userId: string,
  deviceId: string,
  publicKey: Uint8Array,
  proof: Uint8Array,
): Uint8Array {
  if (publicKey.length !== PUBLIC_KEY_BYTES) throw new CryptoError('public-key');
  const expected = deviceKeyProof(account, userId, deviceId, publicKey);
  if (proof.length !== PROOF_BYTES || !equalBytes(expected, proof)) throw new CryptoError('device-proof');
  return publicKey;
}

/** A random key of one epoch after the first. */
export class EpochKey {
  readonly #bytes: Uint8Array;

  private constructor(bytes: Uint8Array) {
    this.#bytes = Uint8Array.from(checkKeyBytes(bytes));
  }

  static generate(): EpochKey {
    return new EpochKey(randomBytes(KEY_BYTES));
  }

  static fromBase64(text: string): EpochKey {
    return new EpochKey(decodeKey(text));
  }

  /** @internal */
  static fromBytes(bytes: Uint8Array): EpochKey {
    return new EpochKey(bytes);
  }

  /** For the local store only. */
  toBase64(): string {
    return toBase64Url(this.#bytes);
  }

  /** @internal */
  bytes(): Uint8Array {
    return this.#bytes;
  }

  subkey(epoch: number): Uint8Array {
    return hkdf(sha256, this.#bytes, EPOCH_KEY_SALT, epochInfo(epoch), 32);
  }

  proof(account: AccountKey, userId: string, epoch: number): Uint8Array {
    return mac(account.macKey(EPOCH_PROOF_LABEL), [utf8(userId), u32be(epoch), this.#bytes]);
  }

  toString(): string {
    return 'EpochKey(<hidden>)';
  }

  toJSON(): string {
    return 'EpochKey(<hidden>)';
  }
}

/** Who a sealed epoch key is for. */
export interface SealedFor {
  userId: string;
  deviceId: string;
  epoch: number;
}

function sealedAssociatedData(sealedFor: SealedFor): Uint8Array {
  return concat(
    SEALED_KEY_LABEL,
    lengthPrefixed([utf8(sealedFor.userId), utf8(sealedFor.deviceId), u32be(sealedFor.epoch)]),
  );
}

function boxKey(shared: Uint8Array, ephemeral: Uint8Array, recipient: Uint8Array): Uint8Array {
  return hkdf(sha256, shared, concat(ephemeral, recipient), SEALED_KEY_LABEL, 32);
}

/**
 * Seals `key` to the recipient's public key. `ephemeral` and `nonce` are random unless given
 * (tests and vectors only).
 */
export function sealEpochKey(
  account: AccountKey,
  recipientPublicKey: Uint8Array,
  sealedFor: SealedFor,
  key: EpochKey,
  options: { ephemeral?: DeviceSecret; nonce?: Uint8Array } = {},
): Uint8Array {
  if (recipientPublicKey.length !== PUBLIC_KEY_BYTES) throw new CryptoError('public-key');
  const ephemeral = options.ephemeral ?? DeviceSecret.generate();
  const ephemeralPublic = ephemeral.publicKey();
  let shared: Uint8Array;
  try {
    shared = ephemeral.sharedSecret(recipientPublicKey);
  } catch {
    throw new CryptoError('public-key');
  }
  const nonce = options.nonce ?? randomBytes(NONCE_BYTES);
  const plaintext = concat(key.bytes(), key.proof(account, sealedFor.userId, sealedFor.epoch));
  const ciphertext = xchacha20poly1305(
    boxKey(shared, ephemeralPublic, recipientPublicKey),
    nonce,
    sealedAssociatedData(sealedFor),
  ).encrypt(plaintext);
  return concat(ephemeralPublic, nonce, ciphertext);
}

/** Opens a key sealed to this device and checks that a holder of the account key made it for this user, device and epoch. */
export function openEpochKey(
  account: AccountKey,
  secret: DeviceSecret,
  sealedFor: SealedFor,
  sealed: Uint8Array,
): EpochKey {
  if (sealed.length !== SEALED_KEY_BYTES) throw new CryptoError('sealed-key');
  const ephemeral = sealed.subarray(0, PUBLIC_KEY_BYTES);
  const nonce = sealed.subarray(PUBLIC_KEY_BYTES, PUBLIC_KEY_BYTES + NONCE_BYTES);
  const ciphertext = sealed.subarray(PUBLIC_KEY_BYTES + NONCE_BYTES);
  let plaintext: Uint8Array;
  try {
    const shared = secret.sharedSecret(ephemeral);
    plaintext = xchacha20poly1305(
      boxKey(shared, ephemeral, secret.publicKey()),
      nonce,
      sealedAssociatedData(sealedFor),
    ).decrypt(ciphertext);
  } catch {
    throw new CryptoError('sealed-key');
  }
  const key = EpochKey.fromBytes(plaintext.subarray(0, 32));
  if (!equalBytes(key.proof(account, sealedFor.userId, sealedFor.epoch), plaintext.subarray(32))) {
    throw new CryptoError('sealed-key');
  }
  return key;
}

/** The keys of every epoch after the first this device holds. */
export class EpochKeys {
  readonly #keys = new Map<number, EpochKey>();

  insert(epoch: number, key: EpochKey): void {
    if (epoch < 2) throw new RangeError("epoch 1 is the account key's");
    this.#keys.set(epoch, key);
  }

  get(epoch: number): EpochKey | undefined {
    return this.#keys.get(epoch);
  }

  /** The newest epoch held (1 when none after the first). */
  newest(): number {
    return Math.max(1, ...this.#keys.keys());
  }

  entries(): [number, EpochKey][] {
    return [...this.#keys.entries()].sort(([a], [b]) => a - b);
  }
}

/** Seals and opens changes under the epochs a device holds. */
export class Keyring {
  constructor(
    readonly account: AccountKey,
    readonly epochs: EpochKeys = new EpochKeys(),
  ) {}

  private subkey(epoch: number): Uint8Array {
    if (epoch === 1) return this.account.epochSubkey(1);
    const key = this.epochs.get(epoch);
    if (!key) throw new CryptoError('no-epoch-key', `epoch ${epoch}`);
    return key.subkey(epoch);
  }

  /** Encrypts under `binding.keyEpoch`; `nonce` is random unless given (tests and vectors only). */
  seal(binding: Binding, plaintext: Uint8Array, nonce?: Uint8Array): { nonce: Uint8Array; ciphertext: Uint8Array } {
    return sealWith(this.subkey(binding.keyEpoch), binding, plaintext, nonce);
  }

  open(binding: Binding, nonce: Uint8Array, ciphertext: Uint8Array): Uint8Array {
    return openWith(this.subkey(binding.keyEpoch), binding, nonce, ciphertext);
  }
}

/** A device as the server lists it (ListDeviceKeys): its public key and proof, empty while unregistered. */
export interface ListedDeviceKey {
  deviceId: string;
  publicKey: Uint8Array;
  proof: Uint8Array;
}

/** One epoch key sealed to one device, as StartKeyEpoch and ShareEpochKeys take it. */
export interface SealedCopy {
  deviceId: string;
  epoch: number;
  sealed: Uint8Array;
}

/**
 * Seals `key` of `epoch` to each device with a registered public key, as the Rust client's
 * rotation does: a device whose proof does not verify with the account key is refused (the
 * server cannot slip in a key of its own), and so is the whole rotation (throws). Devices
 * without a key are left out: the server lists them as missing the epoch, for a later share.
 */
export function sealToDevices(
  account: AccountKey,
  userId: string,
  epoch: number,
  key: EpochKey,
  devices: ListedDeviceKey[],
): SealedCopy[] {
  if (epoch < 2) throw new RangeError("epoch 1 is the account key's");
  return devices
    .filter((device) => device.publicKey.length > 0)
    .map((device) => {
      let publicKey: Uint8Array;
      try {
        publicKey = verifyDeviceKey(account, userId, device.deviceId, device.publicKey, device.proof);
      } catch (error) {
        const kind = error instanceof CryptoError ? error.kind : 'device-proof';
        throw new CryptoError(kind, `device ${device.deviceId}; no key is sealed to it`);
      }
      return { deviceId: device.deviceId, epoch, sealed: sealEpochKey(account, publicKey, { userId, deviceId: device.deviceId, epoch }, key) };
    });
}
