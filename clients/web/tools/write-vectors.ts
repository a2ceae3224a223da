/**
 * Writes vectors made by this package for the Rust client to check
 * (`cargo test -p lockstep-client --test web_vectors -- --ignored`, with `LOCKSTEP_WEB_VECTORS`).
 * Usage: `node dist/tools/write-vectors.js <out.json>`.
 */
import { writeFileSync } from 'node:fs';

import { randomBytes } from '@noble/hashes/utils.js';

import {
  AccountKey,
  type Binding,
  ChangePayload,
  DeviceSecret,
  EpochKey,
  EpochKeys,
  type JsonValue,
  Keyring,
  REVOCATIONS_COLLECTION,
  RecordState,
  type RevokedDevice,
  associatedData,
  deviceKeyProof,
  encodePairingCode,
  isRevoked,
  newId,
  revocationFields,
  revocationRecordId,
  sealEpochKey,
  sealToDevices,
  toHex,
} from '../src/index.js';

const DEVICES = ['a', 'b', 'web', '\uFF21', '\u{1F600}', 'é'];
const FIELDS = ['title', 'body', 'tags', 'parent', '\uFF21', '\u{1F600}'];
const VALUES: JsonValue[] = [
  null,
  true,
  0,
  -5,
  2n ** 63n + 1n,
  1.5,
  'x',
  'X',
  'é',
  '\u{1F600}',
  '\uFF21',
  'a "quoted"\nline \\ \u0001',
  ['a', 1],
  { z: 1, a: { b: null }, '\uFF21': 1, '\u{1F600}': 2 },
];

/** A small seeded generator (xorshift), so that the merge cases repeat. */
let seed = 0x2222_2222;
function random(below: number): number {
  seed ^= seed << 13;
  seed ^= seed >>> 17;
  seed ^= seed << 5;
  return (seed >>> 0) % below;
}
function pick<T>(items: T[]): T {
  return items[random(items.length)]!;
}

function randomState(): RecordState {
  const state = new RecordState();
  for (let i = random(6); i > 0; i--) {
    const stamp = { hlc: BigInt(1 + random(7)) << BigInt(random(2) * 60), device: pick(DEVICES) };
    if (random(5) === 0) {
      state.delete(stamp);
    } else {
      const edit: { [name: string]: JsonValue } = {};
      for (let j = 1 + random(3); j > 0; j--) edit[pick(FIELDS)] = pick(VALUES);
      state.set(edit, stamp);
    }
  }
  return state;
}

const text = (state: RecordState): string => state.toJsonText();

function merges(): unknown[] {
  return Array.from({ length: 300 }, () => {
    const a = randomState();
    const b = random(2) === 0 ? randomState() : (() => {
      const shared = a.clone();
      shared.merge(randomState());
      return shared;
    })();
    const merged = a.clone();
    const changed = merged.merge(b);
    return { a: text(a), b: text(b), merged: text(merged), changed, deleted: merged.isDeleted() };
  });
}

function envelopes(): unknown[] {
  return Array.from({ length: 12 }, (_, index) => {
    const account = AccountKey.generate();
    const epochs = new EpochKeys();
    const keyEpoch = 1 + (index % 3);
    for (let epoch = 2; epoch <= keyEpoch; epoch++) epochs.insert(epoch, EpochKey.generate());
    const binding: Binding = {
      userId: `user-${index}-é`,
      recordId: newId(),
      collection: ['notes', 'passwords'][index % 2]!,
      op: 1 + (index % 2),
      keyEpoch,
    };
    const plaintext = index === 0 ? randomBytes(40) : new ChangePayload(randomState()).encode();
    const { nonce, ciphertext } = new Keyring(account, epochs).seal(binding, plaintext);
    return {
      account_key: account.toBase64(),
      epoch_keys: Object.fromEntries(epochs.entries().map(([epoch, key]) => [String(epoch), key.toBase64()])),
      binding: {
        user_id: binding.userId,
        record_id: binding.recordId,
        collection: binding.collection,
        op: binding.op,
        key_epoch: binding.keyEpoch,
      },
      associated_data: toHex(associatedData(binding)),
      nonce: toHex(nonce),
      plaintext: toHex(plaintext),
      is_payload: index !== 0,
      ciphertext: toHex(ciphertext),
    };
  });
}

function sealedEpochKeys(): unknown[] {
  return Array.from({ length: 8 }, (_, index) => {
    const account = AccountKey.generate();
    const device = DeviceSecret.generate();
    const key = EpochKey.generate();
    const [userId, deviceId, epoch] = [`user-${index}`, newId(), 2 + index];
    const sealed = sealEpochKey(account, device.publicKey(), { userId, deviceId, epoch }, key);
    return {
      account_key: account.toBase64(),
      device_secret: device.toBase64(),
      device_public_key: toHex(device.publicKey()),
      device_key_proof: toHex(deviceKeyProof(account, userId, deviceId, device.publicKey())),
      user_id: userId,
      device_id: deviceId,
      epoch,
      epoch_key: key.toBase64(),
      sealed: toHex(sealed),
    };
  });
}

/**
 * Rotations as `SyncEngine.revoke` makes them: a device of four is revoked, the next epoch's
 * key is sealed (with `sealToDevices`) to the three others only, and the revocation's control
 * record is sealed under the new epoch. Rust opens every copy with the recipient's secret,
 * finds none for the revoked device, and reads the control record as its store does.
 */
function rotations(): unknown[] {
  return Array.from({ length: 4 }, (_, index) => {
    const account = AccountKey.generate();
    const userId = `user-${index}-rotation`;
    const epoch = 2 + index;
    const devices = Array.from({ length: 4 }, (_, n) => {
      const secret = DeviceSecret.generate();
      const deviceId = n === 0 ? newId() : `device-${n}`;
      return { deviceId, secret, publicKey: secret.publicKey(), proof: deviceKeyProof(account, userId, deviceId, secret.publicKey()) };
    });
    const revokedDevice = devices[1 + (index % 3)]!;
    const revoked: RevokedDevice = { deviceId: revokedDevice.deviceId, publicKey: revokedDevice.publicKey, revokedInEpoch: epoch - 1 };
    const remaining = devices.filter((device) => !isRevoked([revoked], device.deviceId, device.publicKey));
    const key = EpochKey.generate();
    const sealed = sealToDevices(account, userId, epoch, key, remaining);
    const state = new RecordState();
    state.set(revocationFields(revoked), { hlc: (BigInt(1_800_000_000_000 + index) << 16n) | 1n, device: devices[0]!.deviceId });
    const plaintext = new ChangePayload(state).encode();
    const binding: Binding = { userId, recordId: revocationRecordId(revoked.deviceId), collection: REVOCATIONS_COLLECTION, op: 1, keyEpoch: epoch };
    const epochs = new EpochKeys();
    epochs.insert(epoch, key);
    const { nonce, ciphertext } = new Keyring(account, epochs).seal(binding, plaintext);
    return {
      account_key: account.toBase64(),
      user_id: userId,
      epoch,
      epoch_key: key.toBase64(),
      devices: devices.map((device) => ({
        device_id: device.deviceId,
        device_secret: device.secret.toBase64(),
        public_key: toHex(device.publicKey),
        proof: toHex(device.proof),
      })),
      revoked_device_id: revoked.deviceId,
      sealed_keys: sealed.map((copy) => ({ device_id: copy.deviceId, epoch: copy.epoch, sealed: toHex(copy.sealed) })),
      control_record: {
        record_id: binding.recordId,
        collection: binding.collection,
        op: binding.op,
        key_epoch: binding.keyEpoch,
        nonce: toHex(nonce),
        ciphertext: toHex(ciphertext),
        plaintext: toHex(plaintext),
      },
    };
  });
}

function pairingCodes(): unknown[] {
  return [
    ['http://127.0.0.1:50051', 'lsp_web'],
    ['https://sync.example', 'lsp_é_\u{1F600}'],
  ].map(([server, ticket]) => {
    const key = AccountKey.generate();
    return { text: encodePairingCode({ server: server!, ticket: ticket!, key }), server, ticket, key: key.toBase64() };
  });
}

const out = process.argv[2];
if (!out) {
  console.error('usage: write-vectors <out.json>');
  process.exit(2);
}
const vectors = {
  producer: 'typescript',
  envelopes: envelopes(),
  sealed_epoch_keys: sealedEpochKeys(),
  rotations: rotations(),
  merges: merges(),
  pairing_codes: pairingCodes(),
  ids: Array.from({ length: 50 }, () => newId()),
};
writeFileSync(out, JSON.stringify(vectors, null, 1));
console.log(`wrote ${out}`);
