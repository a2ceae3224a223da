/** The package on its own: round trips, refusals and the merge's laws (the vectors check agreement with Rust). */
import assert from 'node:assert/strict';
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
  IdGenerator,
  type JsonValue,
  Keyring,
  PairingCodeError,
  PayloadError,
  RecordState,
  SEALED_KEY_BYTES,
  associatedData,
  canonicalJson,
  decodePairingCode,
  encodePairingCode,
  fromPhysicalMs,
  newId,
  openEpochKey,
  parseJson,
  physicalMs,
  sealEpochKey,
  utf8,
  validateCollection,
  validateRecordId,
} from '../src/index.js';

const binding: Binding = { userId: 'u1', recordId: 'r1', collection: 'notes', op: 1, keyEpoch: 1 };

describe('envelopes', () => {
  it('open with the same binding only', () => {
    const key = AccountKey.generate();
    const { nonce, ciphertext } = key.seal(binding, utf8('hello'));
    assert.deepEqual(key.open(binding, nonce, ciphertext), utf8('hello'));
    for (const moved of [
      { ...binding, userId: 'u2' },
      { ...binding, recordId: 'r2' },
      { ...binding, collection: 'notez' },
      { ...binding, op: 2 },
      { ...binding, keyEpoch: 2 },
    ]) {
      assert.throws(() => key.open(moved, nonce, ciphertext), CryptoError);
    }
    assert.throws(() => AccountKey.generate().open(binding, nonce, ciphertext), CryptoError);
    assert.throws(() => key.open(binding, nonce.subarray(1), ciphertext), (error: unknown) => (error as CryptoError).kind === 'nonce');
    const a = associatedData({ ...binding, userId: 'ab', recordId: 'c' });
    const b = associatedData({ ...binding, userId: 'a', recordId: 'bc' });
    assert.notDeepEqual(a, b, 'length prefixes keep fields apart');
  });

  it('keys round trip as text and stay hidden', () => {
    const key = AccountKey.generate();
    assert.ok(AccountKey.fromBase64(key.toBase64()).equals(key));
    assert.throws(() => AccountKey.fromBase64('short'), CryptoError);
    assert.throws(() => AccountKey.fromBase64(`${key.toBase64()}=`), CryptoError);
    assert.equal(String(key), 'AccountKey(<hidden>)');
    assert.equal(JSON.stringify({ key }), '{"key":"AccountKey(<hidden>)"}');
  });
});

describe('key epochs', () => {
  it('a sealed epoch key opens for its device, user and epoch only; the keyring uses it', () => {
    const account = AccountKey.generate();
    const device = DeviceSecret.generate();
    const key = EpochKey.generate();
    const sealedFor = { userId: 'u1', deviceId: 'd1', epoch: 2 };
    const sealed = sealEpochKey(account, device.publicKey(), sealedFor, key);
    assert.equal(sealed.length, SEALED_KEY_BYTES);
    assert.equal(openEpochKey(account, device, sealedFor, sealed).toBase64(), key.toBase64());
    assert.throws(() => openEpochKey(account, device, { ...sealedFor, deviceId: 'd2' }, sealed), CryptoError);
    assert.throws(() => openEpochKey(AccountKey.generate(), device, sealedFor, sealed), CryptoError, 'a stranger’s proof');
    assert.throws(() => sealEpochKey(account, new Uint8Array(32), sealedFor, key), CryptoError, 'a low-order key');
    const epochs = new EpochKeys();
    epochs.insert(2, key);
    const keyring = new Keyring(account, epochs);
    assert.equal(epochs.newest(), 2);
    const { nonce, ciphertext } = keyring.seal({ ...binding, keyEpoch: 2 }, utf8('after revocation'));
    assert.deepEqual(keyring.open({ ...binding, keyEpoch: 2 }, nonce, ciphertext), utf8('after revocation'));
    assert.throws(() => new Keyring(account).open({ ...binding, keyEpoch: 2 }, nonce, ciphertext), (error: unknown) => (error as CryptoError).kind === 'no-epoch-key');
    assert.throws(() => account.open({ ...binding, keyEpoch: 2 }, nonce, ciphertext), CryptoError, 'the account key cannot derive epoch 2');
  });
});

function stamp(hlc: number | bigint, device: string) {
  return { hlc: BigInt(hlc), device };
}

describe('merge', () => {
  it('later writer wins per field, new fields survive, both orders agree', () => {
    const base = new RecordState();
    base.set({ password: 'old', site: 'example.org' }, stamp(1, 'phone'));
    const phone = base.clone();
    phone.set({ password: 'from phone', note: 'phone note' }, stamp(5, 'phone'));
    const laptop = base.clone();
    laptop.set({ password: 'from laptop', tags: ['work'] }, stamp(7, 'laptop'));
    const a = phone.clone();
    a.merge(laptop);
    const b = laptop.clone();
    b.merge(phone);
    assert.equal(a.toJsonText(), b.toJsonText());
    assert.deepEqual(a.visible(), { note: 'phone note', password: 'from laptop', site: 'example.org', tags: ['work'] });
  });

  it('a delete races an edit by stamp; a later edit brings every field back', () => {
    const record = new RecordState();
    record.set({ title: 't', body: 'b' }, stamp(1, 'a'));
    const deleted = record.clone();
    deleted.delete(stamp(10, 'a'));
    const edited = record.clone();
    edited.set({ title: 't2' }, stamp(9, 'b'));
    const merged = edited.clone();
    merged.merge(deleted);
    assert.ok(merged.isDeleted());
    assert.equal(merged.visible(), null);
    const later = record.clone();
    later.set({ title: 't3' }, stamp(11, 'b'));
    merged.merge(later);
    assert.deepEqual(merged.visible(), { body: 'b', title: 't3' });
  });

  it('is commutative, associative and idempotent on random states', () => {
    const devices = ['a', 'b', '\uFF21', '\u{1F600}'];
    const values: JsonValue[] = [null, 1, 'x', 'y', [1], { k: 2n ** 64n - 1n }];
    let seed = 7;
    const random = (below: number) => ((seed = (seed * 1103515245 + 12345) % 2 ** 31), seed % below);
    const randomState = () => {
      const state = new RecordState();
      for (let i = random(5); i > 0; i--) {
        const at = stamp(1 + random(4), devices[random(devices.length)]!);
        if (random(4) === 0) state.delete(at);
        else state.set({ [['f', 'g', 'h'][random(3)]!]: values[random(values.length)]! }, at);
      }
      return state;
    };
    const join = (...states: RecordState[]) => {
      const out = new RecordState();
      for (const state of states) out.merge(state);
      return out.toJsonText();
    };
    for (let i = 0; i < 300; i++) {
      const [a, b, c] = [randomState(), randomState(), randomState()];
      assert.equal(join(a, b), join(b, a));
      assert.equal(join(RecordState.fromJsonText(join(a, b)), c), join(a, RecordState.fromJsonText(join(b, c))));
      assert.equal(join(a, a), join(a));
      const again = RecordState.fromJsonText(join(a, b));
      assert.equal(again.merge(b), false, 'merging what was merged changes nothing');
    }
  });

  it('payloads carry 64-bit clocks and values exactly, and refuse other versions', () => {
    const state = new RecordState();
    state.set({ big: 18446744073709551615n, small: -3, nested: { z: 1, a: 'é' } }, stamp(2n ** 63n + 5n, 'd'));
    const payload = new ChangePayload(state);
    const decoded = ChangePayload.decode(payload.encode());
    assert.equal(decoded.state.toJsonText(), state.toJsonText());
    assert.equal(decoded.state.maxHlc(), 2n ** 63n + 5n);
    assert.match(new TextDecoder().decode(payload.encode()), /"nested":\{"value":\{"a":"é","z":1\}/);
    assert.throws(() => ChangePayload.decode(utf8('{"v":2,"state":{"shape":"new"}}')), (error: unknown) => error instanceof PayloadError && error.kind === 'unknown-version' && error.found === 2);
    assert.throws(() => ChangePayload.decode(utf8('nonsense')), (error: unknown) => (error as PayloadError).kind === 'malformed');
    assert.equal(canonicalJson(parseJson('{"b":[1,2.5,{"d":null,"c":true}],"a":"x"}')), '{"a":"x","b":[1,2.5,{"c":true,"d":null}]}');
  });
});

describe('clock and ids', () => {
  it('stamps increase, follow wall time and refuse remote stamps too far ahead', () => {
    const now = 1_700_000_000_000;
    const clock = new Clock(0n, { maxAheadMs: 60_000, now: () => now });
    const first = clock.tick();
    assert.equal(physicalMs(first), BigInt(now));
    assert.ok(clock.tick() > first);
    const remote = fromPhysicalMs(now + 30_000) + 7n;
    clock.observe(remote);
    assert.ok(clock.tick() > remote);
    const tooFar = fromPhysicalMs(now + 61_000);
    assert.throws(() => clock.observe(tooFar), (error: unknown) => error instanceof ClockError && error.aheadMs === 61_000n);
    assert.ok(clock.last() < tooFar);
    clock.observeHeld(tooFar);
    assert.ok(clock.tick() > tooFar);
  });

  it('ids are UUIDv7, strictly increasing, also when the wall clock stands still or steps back', () => {
    let now = 1_700_000_000_000;
    const ids = new IdGenerator(() => now);
    const made = Array.from({ length: 5_000 }, (_, i) => {
      if (i % 1000 === 999) now -= 5;
      return ids.next();
    });
    assert.deepEqual([...made].sort(), made);
    assert.equal(new Set(made).size, made.length);
    for (const id of [made[0]!, newId()]) {
      assert.match(id, /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
      validateRecordId(id);
    }
    assert.throws(() => validateRecordId('a b'));
    assert.throws(() => validateCollection('Passwords'));
    validateCollection('passwords');
  });
});

describe('pairing codes', () => {
  it('round trip, also inside what `pair show` printed; bad ones are explained', () => {
    const code = { server: 'http://127.0.0.1:50051', ticket: 'lsp_abc', key: AccountKey.generate() };
    const text = encodePairingCode(code);
    assert.ok(text.startsWith('LOCKSTEP1:'));
    const back = decodePairingCode(`  ${text}\n`);
    assert.deepEqual([back.server, back.ticket], [code.server, code.ticket]);
    assert.ok(back.key.equals(code.key));
    assert.ok(decodePairingCode(`█▀▀█\n${text}\n\nOn the new device: …\n`).key.equals(code.key));
    assert.throws(() => decodePairingCode('hello'), (error: unknown) => error instanceof PairingCodeError && /LOCKSTEP1/.test(error.message));
    assert.throws(() => decodePairingCode('LOCKSTEP1:!!!'), PairingCodeError);
  });
});

describe('gRPC-Web framing', () => {
  it('frames split anywhere come back whole; trailers and trailers-only answers carry the status', async () => {
    const { FrameReader, GrpcStatus, callStatus, frame } = await import('../src/grpc-web.js');
    const trailers = utf8('grpc-status:16\r\ngrpc-message:no%20token\r\n');
    const body = new Uint8Array([...frame(utf8('one')), ...frame(new Uint8Array(0)), ...frame(utf8('three')), 0x80, 0, 0, 0, trailers.length, ...trailers]);
    for (let cut = 1; cut < body.length; cut += 3) {
      const reader = new FrameReader();
      const frames = [...reader.push(body.subarray(0, cut)), ...reader.push(body.subarray(cut))];
      assert.ok(reader.atFrameBoundary());
      assert.deepEqual(
        frames.filter((f) => f.kind === 'message').map((f) => new TextDecoder().decode(f.message)),
        ['one', '', 'three'],
      );
      const last = frames.find((f) => f.kind === 'trailers');
      assert.ok(last && last.kind === 'trailers');
      assert.deepEqual(callStatus(last.trailers, new Headers()), { code: GrpcStatus.Unauthenticated, message: 'no token' });
    }
    const headers = new Headers({ 'grpc-status': '8', 'grpc-message': 'busy' });
    assert.deepEqual(callStatus(undefined, headers), { code: GrpcStatus.ResourceExhausted, message: 'busy' });
    assert.equal(callStatus(undefined, new Headers()), null);
    assert.throws(() => new FrameReader(10).push(frame(new Uint8Array(11))));
  });
});
