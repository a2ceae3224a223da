/**
 * Checks this package against vectors written by the Rust client
 * (`cargo run -p lockstep-client --example web_vectors -- rust.json`), named by
 * `LOCKSTEP_RUST_VECTORS`; `scripts/test` sets it. Without it the checks are skipped.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { describe, it } from 'node:test';

import {
  AccountKey,
  type Binding,
  ChangePayload,
  Clock,
  ClockError,
  CryptoError,
  DeviceSecret,
  EpochKey,
  EpochKeys,
  Keyring,
  RecordState,
  associatedData,
  canonicalJson,
  decodePairingCode,
  deviceKeyProof,
  fromHex,
  isRevoked,
  readRevocation,
  REVOCATIONS_COLLECTION,
  openEpochKey,
  parseJson,
  toHex,
  validateRecordId,
  verifyDeviceKey,
} from '../src/index.js';

import { decodeQrFrame } from '../app/scan.js';

/**
 * What a camera would see of the QR code the CLI drew with Unicode half blocks (light modules
 * inked, for a dark terminal): dark modules black, light ones white, 4 pixels each, RGBA.
 */
function halfBlockQrToRgba(shown: string): { rgba: Uint8ClampedArray; width: number; height: number } {
  const isQrLine = (line: string) => line.length > 20 && /^[ ▀▄█]+$/u.test(line);
  const lines = shown.split('\n').filter(isQrLine).map((line) => [...line]);
  const size = lines[0]!.length;
  const scale = 4;
  const [width, height] = [size * scale, size * scale];
  const rgba = new Uint8ClampedArray(width * height * 4).fill(255);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const [mx, my] = [Math.floor(x / scale), Math.floor(y / scale)];
      const glyph = lines[Math.floor(my / 2)]![mx]!;
      const light = my % 2 === 0 ? glyph === '▀' || glyph === '█' : glyph === '▄' || glyph === '█';
      if (!light) rgba.fill(0, (y * width + x) * 4, (y * width + x) * 4 + 3);
    }
  }
  return { rgba, width, height };
}

/* eslint-disable @typescript-eslint/no-explicit-any */
type Vectors = any;

const path = process.env.LOCKSTEP_RUST_VECTORS;
const skip = path ? false : 'LOCKSTEP_RUST_VECTORS is not set (scripts/test writes the Rust vectors and sets it)';
const vectors: Vectors = path ? parseJson(readFileSync(path, 'utf8')) : {};

function binding(json: any): Binding {
  return {
    userId: json.user_id,
    recordId: json.record_id,
    collection: json.collection,
    op: Number(json.op),
    keyEpoch: Number(json.key_epoch),
  };
}

describe('rust vectors', { skip }, () => {
  it('envelopes: same associated data, they open, and sealing with their nonce gives their ciphertext', () => {
    assert.ok(vectors.envelopes.length >= 20);
    for (const envelope of vectors.envelopes) {
      const epochs = new EpochKeys();
      for (const [epoch, key] of Object.entries(envelope.epoch_keys)) epochs.insert(Number(epoch), EpochKey.fromBase64(key as string));
      const keyring = new Keyring(AccountKey.fromBase64(envelope.account_key), epochs);
      const bound = binding(envelope.binding);
      assert.equal(toHex(associatedData(bound)), envelope.associated_data);
      const [nonce, ciphertext] = [fromHex(envelope.nonce), fromHex(envelope.ciphertext)];
      const plaintext = keyring.open(bound, nonce, ciphertext);
      assert.equal(toHex(plaintext), envelope.plaintext);
      assert.equal(toHex(keyring.seal(bound, plaintext, nonce).ciphertext), envelope.ciphertext);
      for (const moved of [
        { ...bound, userId: `${bound.userId}x` },
        { ...bound, recordId: `${bound.recordId}x` },
        { ...bound, collection: 'other' },
        { ...bound, op: 3 - bound.op },
      ]) {
        assert.throws(() => keyring.open(moved, nonce, ciphertext), (error: unknown) => error instanceof CryptoError && error.kind === 'decrypt');
      }
      assert.throws(() => keyring.open({ ...bound, keyEpoch: bound.keyEpoch + 1 }, nonce, ciphertext), CryptoError);
      if (envelope.is_payload) {
        // The payload decodes, and encodes back to the very bytes the Rust client wrote.
        const payload = ChangePayload.decode(plaintext);
        assert.equal(toHex(payload.encode()), envelope.plaintext);
      }
    }
  });

  it('sealed epoch keys open for their device only, and device key proofs agree', () => {
    for (const sealed of vectors.sealed_epoch_keys) {
      const account = AccountKey.fromBase64(sealed.account_key);
      const secret = DeviceSecret.fromBase64(sealed.device_secret);
      assert.equal(toHex(secret.publicKey()), sealed.device_public_key);
      const sealedFor = { userId: sealed.user_id, deviceId: sealed.device_id, epoch: Number(sealed.epoch) };
      const key = openEpochKey(account, secret, sealedFor, fromHex(sealed.sealed));
      assert.equal(key.toBase64(), sealed.epoch_key);
      for (const other of [{ ...sealedFor, deviceId: 'another' }, { ...sealedFor, epoch: sealedFor.epoch + 1 }, { ...sealedFor, userId: 'u' }]) {
        assert.throws(() => openEpochKey(account, secret, other, fromHex(sealed.sealed)), CryptoError);
      }
      assert.throws(() => openEpochKey(AccountKey.generate(), secret, sealedFor, fromHex(sealed.sealed)), CryptoError);
      assert.throws(() => openEpochKey(account, DeviceSecret.generate(), sealedFor, fromHex(sealed.sealed)), CryptoError);
      const publicKey = fromHex(sealed.device_public_key);
      assert.equal(toHex(deviceKeyProof(account, sealed.user_id, sealed.device_id, publicKey)), sealed.device_key_proof);
      verifyDeviceKey(account, sealed.user_id, sealed.device_id, publicKey, fromHex(sealed.device_key_proof));
      assert.throws(() => verifyDeviceKey(account, sealed.user_id, 'another', publicKey, fromHex(sealed.device_key_proof)), CryptoError);
    }
  });

  it('the QR code `pair show` draws decodes to the pairing code with the PWA scanner', () => {
    for (const code of vectors.pairing_codes) {
      const frame = halfBlockQrToRgba(code.shown);
      assert.equal(decodeQrFrame(frame.rgba, frame.width, frame.height), code.text);
    }
  });

  it('revocation control records the Rust store wrote read as the same revocations', () => {
    assert.ok(vectors.revocation_records.length >= 3);
    for (const record of vectors.revocation_records) {
      assert.equal(record.collection, REVOCATIONS_COLLECTION);
      assert.equal(record.record_id, `revoked:${record.device_id}`);
      const state = RecordState.fromJsonText(record.state);
      const fields = Object.fromEntries([...state.fields].map(([name, field]) => [name, field.value]));
      const revoked = readRevocation(fields);
      assert.ok(revoked, record.state);
      assert.equal(revoked.deviceId, record.device_id);
      assert.equal(toHex(revoked.publicKey), record.public_key);
      assert.equal(revoked.revokedInEpoch, Number(record.revoked_in_epoch));
      assert.ok(isRevoked([revoked], record.device_id, new Uint8Array()));
      assert.equal(isRevoked([revoked], 'another', fromHex(record.public_key)), record.public_key !== '');
      assert.equal(state.toJsonText(), RecordState.fromJsonText(record.state).toJsonText());
    }
  });

  it('merges: the same state, serialized byte for byte, both ways', () => {
    assert.ok(vectors.merges.length >= 300);
    let ties = 0;
    for (const [index, merge] of vectors.merges.entries()) {
      const [a, b] = [RecordState.fromJson(merge.a), RecordState.fromJson(merge.b)];
      const expected = canonicalJson(merge.merged);
      const ab = a.clone();
      assert.equal(ab.merge(b), merge.changed, `case ${index}: changed`);
      assert.equal(canonicalJson(parseJson(ab.toJsonText())), expected, `case ${index}`);
      assert.equal(ab.toJsonText(), RecordState.fromJson(merge.merged).toJsonText(), `case ${index}: serialization`);
      const ba = b.clone();
      ba.merge(a);
      assert.equal(ba.toJsonText(), ab.toJsonText(), `case ${index}: commutative`);
      assert.equal(ab.isDeleted(), merge.deleted, `case ${index}: deleted`);
      assert.equal(ab.isLive(), merge.live, `case ${index}: live`);
      assert.equal(canonicalJson(ab.visible()), canonicalJson(merge.visible), `case ${index}: visible`);
      assert.equal(ab.maxHlc(), BigInt(merge.max_hlc), `case ${index}: max hlc`);
      for (const [name, field] of a.fields) {
        const other = b.fields.get(name);
        if (other && other.stamp.hlc === field.stamp.hlc && other.stamp.device === field.stamp.device) ties += 1;
      }
    }
    assert.ok(ties > 20, `equal stamps are decided by value in enough cases (${ties})`);
  });

  it('hlc: the same stamps and refusals from the same wall clock', () => {
    for (const scenario of vectors.hlc) {
      let wall = Number(scenario.start_ms);
      const clock = new Clock(BigInt(scenario.last), { maxAheadMs: Number(scenario.max_ahead_ms), now: () => wall });
      for (const step of scenario.steps) {
        wall = Number(step.wall_ms);
        switch (step.op) {
          case 'tick':
            assert.equal(clock.tick(), BigInt(step.result));
            break;
          case 'observe':
            if (step.result === 'ok') {
              clock.observe(BigInt(step.stamp));
            } else {
              assert.throws(
                () => clock.observe(BigInt(step.stamp)),
                (error: unknown) =>
                  error instanceof ClockError &&
                  error.aheadMs === BigInt(step.result.ahead_ms) &&
                  error.boundMs === BigInt(step.result.bound_ms),
              );
            }
            assert.equal(clock.last(), BigInt(step.last));
            break;
          default:
            clock.observeHeld(BigInt(step.stamp));
            assert.equal(clock.last(), BigInt(step.last));
        }
      }
    }
  });

  it('pairing codes: the code alone or in what `pair show` printed; bad ones explained alike', () => {
    for (const code of vectors.pairing_codes) {
      for (const text of [code.text, `  ${code.text}\n`, code.shown]) {
        const decoded = decodePairingCode(text);
        assert.deepEqual([decoded.server, decoded.ticket, decoded.key.toBase64()], [code.server, code.ticket, code.key]);
      }
    }
    for (const bad of vectors.bad_pairing_codes) {
      assert.throws(() => decodePairingCode(bad.text), (error: unknown) => error instanceof Error && error.message === bad.error);
    }
  });

  it('ids made by the Rust client pass the same checks', () => {
    for (const id of vectors.ids) validateRecordId(id);
  });
});
