/** The IndexedDB store and the transport's error mapping, in Node (fake-indexeddb, a fake fetch). */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import { create, fromBinary, toBinary } from '@bufbuild/protobuf';
import { Dexie } from 'dexie';
import { IDBFactory, IDBKeyRange } from 'fake-indexeddb';

import {
  AccountKey,
  ChangePayload,
  DeviceSecret,
  EpochKey,
  EpochKeys,
  GrpcStatus,
  type Incoming,
  Keyring,
  RecordState,
  RpcError,
  Store,
  SyncEngine,
  Transport,
  dexieTable,
  frame,
  REVOCATIONS_COLLECTION,
  deviceKeyProof,
  keyring,
  openEpochKey,
  readRevocation,
  sealEpochKey,
} from '../src/index.js';
import { RevokeDeviceRequestSchema, RevokeDeviceResponseSchema } from '../src/gen/lockstep/v1/accounts_pb.js';
import {
  GetEpochKeysRequestSchema,
  GetEpochKeysResponseSchema,
  ListDeviceKeysResponseSchema,
  ShareEpochKeysRequestSchema,
  ShareEpochKeysResponseSchema,
  StartKeyEpochRequestSchema,
  StartKeyEpochResponseSchema,
} from '../src/gen/lockstep/v1/keys_pb.js';
import { PushRequestSchema, PushResponseSchema } from '../src/gen/lockstep/v1/sync_pb.js';
import type { Account } from '../src/store.js';

async function openStore(): Promise<[Store, Account]> {
  const store = await Store.open(`test-${Math.random()}`, { indexedDB: new IDBFactory() });
  const account: Account = {
    server: 'http://127.0.0.1:1',
    userId: 'user-1',
    deviceId: 'web-device',
    deviceName: 'browser',
    token: 'token',
    key: AccountKey.generate(),
    deviceSecret: DeviceSecret.generate(),
    epochKeys: new EpochKeys(),
    deviceKeyRegistered: false,
  };
  await store.saveAccount(account);
  return [store, account];
}

function incoming(offset: number, recordId: string, state: RecordState): Incoming {
  return { offset, recordId, collection: 'notes', originDeviceId: 'cli', content: { payload: new ChangePayload(state) } };
}

describe('store', () => {
  it('keeps the account, with its secrets, across opens', async () => {
    const [store, account] = await openStore();
    const again = await store.account();
    assert.equal(again?.userId, account.userId);
    assert.ok(again?.key.equals(account.key));
    assert.deepEqual(again?.deviceSecret.publicKey(), account.deviceSecret.publicKey());
  });

  it('queues each edit with the record and seals it once: a retry sends the same bytes', async () => {
    const [store, account] = await openStore();
    const record = await store.put('notes', null, { title: 'hello' });
    await store.put('notes', record.recordId, { body: 'world' });
    assert.deepEqual((await store.get(record.recordId))?.state.visible(), { title: 'hello', body: 'world' });
    const first = await store.sealedOutboxBatch(10);
    const second = await store.sealedOutboxBatch(10);
    assert.equal(first.length, 2);
    assert.deepEqual(
      second.map((entry) => [entry.changeId, entry.sealed.nonce, entry.sealed.ciphertext]),
      first.map((entry) => [entry.changeId, entry.sealed.nonce, entry.sealed.ciphertext]),
    );
    const opened = keyring(account).open(
      { userId: 'user-1', recordId: record.recordId, collection: 'notes', op: 1, keyEpoch: 1 },
      first[1]!.sealed.nonce,
      first[1]!.sealed.ciphertext,
    );
    assert.deepEqual(ChangePayload.decode(opened).state.visible(), { title: 'hello', body: 'world' });
    await store.outboxDone([first[0]!.seq]);
    assert.equal(await store.outboxLength(), 1);
    await assert.rejects(store.put('_lockstep.revocations', null, { x: 1 }), /reserved/);
  });

  it('merges incoming changes per field, moves the cursor, refuses a gap and never moves back', async () => {
    const [store] = await openStore();
    const mine = await store.put('notes', 'n1', { title: 'mine', local: 1 });
    const theirs = new RecordState();
    theirs.set({ title: 'theirs', remote: 2 }, { hlc: mine.state.maxHlc() + 1n, device: 'cli' });
    const applied = await store.apply([incoming(0, 'n1', theirs)]);
    assert.deepEqual(applied.changedRecords, ['n1']);
    assert.deepEqual((await store.get('n1'))?.state.visible(), { title: 'theirs', local: 1, remote: 2 });
    assert.equal(await store.cursor(), 1);
    await assert.rejects(store.apply([incoming(5, 'n1', theirs)]), /offset 5 where offset 1/);
    assert.equal(await store.cursor(), 1);
    await store.apply([incoming(0, 'n1', theirs)]);
    assert.equal(await store.cursor(), 1);
    const problem: Incoming = { ...incoming(1, 'n2', theirs), content: { problem: 'undecryptable', detail: 'bad tag' } };
    assert.equal((await store.apply([problem])).problems, 1);
    assert.equal((await store.problems())[0]?.kind, 'undecryptable');
  });

  it('a resync keeps every local record and queues what the log lacks', async () => {
    const [store] = await openStore();
    await store.put('notes', 'kept', { title: 'only here' });
    const seen = new RecordState();
    seen.set({ title: 'from the log' }, { hlc: 1n << 16n, device: 'cli' });
    await store.apply([incoming(0, 'logged', seen)]);
    const pushed = await store.sealedOutboxBatch(10);
    await store.outboxDone(pushed.map((entry) => entry.seq));
    await store.beginResync('history-expired', 7);
    assert.equal(await store.cursor(), 7);
    assert.equal(await store.finishResync(), 1);
    assert.deepEqual((await store.outbox()).map((entry) => entry.recordId), ['kept']);
    assert.equal((await store.list('notes')).length, 2);
    assert.equal(await store.finishResync(), null);
  });
});

describe('transport', () => {
  const answer = (status: number, headers: Record<string, string>, body: Uint8Array = new Uint8Array()) =>
    (async () => new Response(body as BodyInit, { status, headers })) as unknown as typeof fetch;

  it('says in words why a call failed', async () => {
    const refused = new Transport('http://server', 'token', {
      fetch: answer(200, { 'grpc-status': String(GrpcStatus.Unauthenticated), 'grpc-message': 'token%20revoked' }),
    });
    const error = await refused.serverInfo().catch((caught: unknown) => caught);
    assert.ok(error instanceof RpcError);
    assert.equal(error.code, GrpcStatus.Unauthenticated);
    assert.match(error.message, /no longer accepts this device.*\(server says: token revoked\)/);
    const down = new Transport('http://server', null, {
      fetch: (async () => {
        throw new TypeError('Failed to fetch');
      }) as unknown as typeof fetch,
    });
    const offline = await down.serverInfo().catch((caught: unknown) => caught);
    assert.ok(offline instanceof RpcError && offline.transient);
    assert.match(offline.message, /cannot be reached right now \(Failed to fetch: is it running, and does its web.allowed_origins/);
  });

  it('reads a message then the status from the trailers frame', async () => {
    const trailers = new TextEncoder().encode('grpc-status: 0\r\n');
    const body = new Uint8Array([...frame(new Uint8Array([0x0a, 0x02, 0x76, 0x31])), 0x80, 0, 0, 0, trailers.length, ...trailers]);
    const ok = new Transport('http://server', null, { fetch: answer(200, {}, body) });
    assert.equal((await ok.serverInfo()).serverVersion, 'v1');
  });
});

describe('engine against a fake server', () => {
  type Handler = (path: string, body: Uint8Array) => Response;
  const fakeFetch = (handler: Handler) =>
    (async (url: string, init: { body: Uint8Array }) => handler(new URL(url).pathname.slice(1), init.body)) as unknown as typeof fetch;
  const ok = (bytes: Uint8Array) => {
    const trailers = new TextEncoder().encode('grpc-status: 0\r\n');
    return new Response(new Uint8Array([...frame(bytes), 0x80, 0, 0, 0, trailers.length, ...trailers]) as BodyInit, {
      status: 200,
    });
  };
  const pushedChanges = (body: Uint8Array) => fromBinary(PushRequestSchema, body.subarray(5)).changes;
  const accepted = (body: Uint8Array) =>
    ok(
      toBinary(
        PushResponseSchema,
        create(PushResponseSchema, {
          results: pushedChanges(body).map((_, index) => ({ result: { case: 'offset' as const, value: BigInt(index) } })),
        }),
      ),
    );

  it('a push that failed is retried with the same bytes', async () => {
    const [store] = await openStore();
    await store.put('notes', 'n1', { title: 'hello' });
    const bodies: Uint8Array[] = [];
    let down = true;
    const engine = new SyncEngine(store, {
      fetch: fakeFetch((path, body) => {
        assert.equal(path, 'lockstep.v1.Sync/Push');
        bodies.push(body);
        if (down) throw new TypeError('Failed to fetch');
        return accepted(body);
      }),
    });
    const error = await engine.push().catch((caught: unknown) => caught);
    assert.ok(error instanceof RpcError && error.transient, String(error));
    assert.equal(await store.outboxLength(), 1);
    down = false;
    assert.equal(await engine.push(), 1);
    assert.equal(bodies.length, 2);
    assert.deepEqual(bodies[1], bodies[0]);
    assert.equal(await store.outboxLength(), 0);
  });

  it('a push refused under a stale epoch fetches the new epoch key and seals again under it', async () => {
    const [store, account] = await openStore();
    account.deviceKeyRegistered = true;
    await store.saveAccount(account);
    await store.put('notes', 'n1', { title: 'after the rotation' });
    const epochKey = EpochKey.generate();
    const sealed = sealEpochKey(
      account.key,
      account.deviceSecret.publicKey(),
      { userId: account.userId, deviceId: account.deviceId, epoch: 2 },
      epochKey,
    );
    const epochs: number[] = [];
    const engine = new SyncEngine(store, {
      fetch: fakeFetch((path, body) => {
        if (path === 'lockstep.v1.Keys/GetEpochKeys') {
          return ok(
            toBinary(
              GetEpochKeysResponseSchema,
              create(GetEpochKeysResponseSchema, {
                currentEpoch: 2,
                sealedKeys: [{ deviceId: account.deviceId, epoch: 2, sealed, sealedByDeviceId: 'laptop' }],
              }),
            ),
          );
        }
        const [change] = pushedChanges(body);
        epochs.push(change!.keyEpoch);
        if (change!.keyEpoch < 2) {
          return new Response(null, { status: 200, headers: { 'grpc-status': '9', 'grpc-message': 'stale key epoch' } });
        }
        const keys = new EpochKeys();
        keys.insert(2, epochKey);
        const plaintext = new Keyring(account.key, keys).open(
          { userId: account.userId, recordId: change!.recordId, collection: change!.collection, op: change!.op, keyEpoch: 2 },
          change!.nonce,
          change!.ciphertext,
        );
        assert.deepEqual(ChangePayload.decode(plaintext).state.visible(), { title: 'after the rotation' });
        return accepted(body);
      }),
    });
    assert.equal(await engine.push(), 1);
    assert.deepEqual(epochs, [1, 2]);
    const stored = await store.account();
    assert.ok(stored?.epochKeys.get(2), 'the epoch key is kept');
    assert.equal(await store.outboxLength(), 0);
  });
});

describe('revoking a device from the browser', () => {
  const ok = (bytes: Uint8Array) => {
    const trailers = new TextEncoder().encode('grpc-status: 0\r\n');
    return new Response(new Uint8Array([...frame(bytes), 0x80, 0, 0, 0, trailers.length, ...trailers]) as BodyInit, {
      status: 200,
    });
  };

  it('records it, starts the next epoch sealed to every remaining device only, and pushes the record under it', async () => {
    const [store, account] = await openStore();
    account.deviceKeyRegistered = true;
    await store.saveAccount(account);
    const laptop = DeviceSecret.generate();
    const stolen = DeviceSecret.generate();
    const listed = (id: string, secret: DeviceSecret) => {
      const publicKey = secret.publicKey();
      return { deviceId: id, publicKey, proof: deviceKeyProof(account.key, account.userId, id, publicKey), missingEpochs: [] as number[] };
    };
    const server = { epoch: 1, revoked: new Set<string>(), rotationDue: false };
    let started: ReturnType<typeof fromBinary<typeof StartKeyEpochRequestSchema>> | null = null;
    const shared: string[] = [];
    const pushed: { collection: string; keyEpoch: number; recordId: string; nonce: Uint8Array; ciphertext: Uint8Array; op: number }[] = [];
    const engine = new SyncEngine(store, {
      fetch: (async (url: string, init: { body: Uint8Array }) => {
        const path = new URL(url).pathname.slice(1);
        const body = init.body.subarray(5);
        switch (path) {
          case 'lockstep.v1.Keys/ListDeviceKeys': {
            // A server that lies: it still lists the revoked device, now as missing epoch 2.
            const devices = [listed(account.deviceId, account.deviceSecret), listed('laptop', laptop), listed('stolen', stolen)];
            if (server.revoked.has('stolen')) devices[2]!.missingEpochs = server.epoch > 1 ? [2] : [];
            return ok(toBinary(ListDeviceKeysResponseSchema, create(ListDeviceKeysResponseSchema, { currentEpoch: server.epoch, devices, rotationDue: server.rotationDue })));
          }
          case 'lockstep.v1.Accounts/RevokeDevice':
            server.revoked.add(fromBinary(RevokeDeviceRequestSchema, body).deviceId);
            server.rotationDue = true;
            return ok(toBinary(RevokeDeviceResponseSchema, create(RevokeDeviceResponseSchema, {})));
          case 'lockstep.v1.Keys/GetEpochKeys':
            return ok(toBinary(GetEpochKeysResponseSchema, create(GetEpochKeysResponseSchema, { currentEpoch: server.epoch, rotationDue: server.rotationDue })));
          case 'lockstep.v1.Keys/StartKeyEpoch':
            started = fromBinary(StartKeyEpochRequestSchema, body);
            server.epoch = started.epoch;
            server.rotationDue = false;
            return ok(toBinary(StartKeyEpochResponseSchema, create(StartKeyEpochResponseSchema, { currentEpoch: server.epoch })));
          case 'lockstep.v1.Keys/ShareEpochKeys':
            shared.push(...fromBinary(ShareEpochKeysRequestSchema, body).sealedKeys.map((sealed) => sealed.deviceId));
            return ok(toBinary(ShareEpochKeysResponseSchema, create(ShareEpochKeysResponseSchema, { stored: 0 })));
          case 'lockstep.v1.Sync/Push': {
            const changes = fromBinary(PushRequestSchema, body).changes;
            pushed.push(...changes);
            return ok(
              toBinary(
                PushResponseSchema,
                create(PushResponseSchema, { results: changes.map((_, index) => ({ result: { case: 'offset' as const, value: BigInt(index) } })) }),
              ),
            );
          }
          default:
            throw new Error(`unexpected call ${path}`);
        }
      }) as unknown as typeof fetch,
    });
    await assert.rejects(engine.revoke(account.deviceId), /this device/);
    const { keys, pushed: pushedCount } = await engine.revoke('stolen');
    assert.equal(keys.startedEpoch, 2);
    assert.equal(pushedCount, 1);
    assert.ok(started, 'StartKeyEpoch was called');
    const request = started as unknown as { epoch: number; sealedKeys: { deviceId: string; epoch: number; sealed: Uint8Array }[] };
    assert.equal(request.epoch, 2);
    assert.deepEqual(request.sealedKeys.map((sealed) => sealed.deviceId).sort(), ['laptop', account.deviceId].sort());
    const laptopCopy = request.sealedKeys.find((sealed) => sealed.deviceId === 'laptop')!;
    const epochKey = openEpochKey(account.key, laptop, { userId: account.userId, deviceId: 'laptop', epoch: 2 }, laptopCopy.sealed);
    const held = (await store.account())!.epochKeys.get(2);
    assert.equal(held?.toBase64(), epochKey.toBase64(), 'this device keeps the key it sealed to the others');
    assert.deepEqual(shared, [], 'nothing is shared with the revoked device, whatever the server lists');
    // The control record went up under the new epoch, readable by the laptop.
    const [record] = pushed;
    assert.equal(record!.collection, REVOCATIONS_COLLECTION);
    assert.equal(record!.recordId, 'revoked:stolen');
    assert.equal(record!.keyEpoch, 2);
    const laptopKeys = new EpochKeys();
    laptopKeys.insert(2, epochKey);
    const plaintext = new Keyring(account.key, laptopKeys).open(
      { userId: account.userId, recordId: record!.recordId, collection: record!.collection, op: record!.op, keyEpoch: 2 },
      record!.nonce,
      record!.ciphertext,
    );
    const revoked = readRevocation(ChangePayload.decode(plaintext).state.visible()!);
    assert.deepEqual(revoked, { deviceId: 'stolen', publicKey: stolen.publicKey(), revokedInEpoch: 1 });
    // A later sync neither rotates again nor shares with the revoked device.
    const again = await engine.syncKeys({ share: true });
    assert.equal(again.startedEpoch, null);
    assert.deepEqual(shared, []);
    await assert.rejects(store.put(REVOCATIONS_COLLECTION, null, { device_id: 'x' }), /reserved/);
    await assert.rejects(store.delete('revoked:stolen'), /reserved/);
  });
});

describe('epoch keys that do not open', () => {
  it('are reported (for another device to share again) and never used', async () => {
    const [store, account] = await openStore();
    account.deviceKeyRegistered = true;
    await store.saveAccount(account);
    const good = EpochKey.generate();
    const sealedFor = (epoch: number) => ({ userId: account.userId, deviceId: account.deviceId, epoch });
    // Epoch 2 sealed with another account's key (its proof does not verify); epoch 3 is fine.
    const forged = sealEpochKey(AccountKey.generate(), account.deviceSecret.publicKey(), sealedFor(2), EpochKey.generate());
    const sealed = sealEpochKey(account.key, account.deviceSecret.publicKey(), sealedFor(3), good);
    const requests: { sinceEpoch: number; unopenedEpochs: number[] }[] = [];
    const engine = new SyncEngine(store, {
      fetch: (async (url: string, init: { body: Uint8Array }) => {
        assert.equal(new URL(url).pathname.slice(1), 'lockstep.v1.Keys/GetEpochKeys');
        const asked = fromBinary(GetEpochKeysRequestSchema, init.body.subarray(5));
        requests.push({ sinceEpoch: asked.sinceEpoch, unopenedEpochs: [...asked.unopenedEpochs] });
        const sealedKeys =
          asked.sinceEpoch === 0
            ? [
                { deviceId: account.deviceId, epoch: 2, sealed: forged, sealedByDeviceId: 'server' },
                { deviceId: account.deviceId, epoch: 3, sealed, sealedByDeviceId: 'laptop' },
              ]
            : [];
        const trailers = new TextEncoder().encode('grpc-status: 0\r\n');
        const answer = toBinary(GetEpochKeysResponseSchema, create(GetEpochKeysResponseSchema, { currentEpoch: 3, sealedKeys }));
        return new Response(new Uint8Array([...frame(answer), 0x80, 0, 0, 0, trailers.length, ...trailers]) as BodyInit, { status: 200 });
      }) as unknown as typeof fetch,
    });
    const outcome = await engine.syncKeys();
    assert.equal(outcome.received, 1);
    assert.deepEqual(requests, [
      { sinceEpoch: 0, unopenedEpochs: [] },
      { sinceEpoch: 3, unopenedEpochs: [2] },
    ]);
    const held = (await store.account())!.epochKeys;
    assert.equal(held.get(2), undefined, 'the forged key is never used');
    assert.equal(held.get(3)?.toBase64(), good.toBase64());
  });
});

describe('an app table (Dexie)', () => {
  it('holds every live record of its collection, and follows edits, merges and deletes', async () => {
    const [store] = await openStore();
    await store.put('notes', 'old', { title: 'kept from before' });
    await store.put('todos', 't1', { text: 'another collection' });
    const db = new Dexie(`app-${Math.random()}`, { indexedDB: new IDBFactory(), IDBKeyRange });
    db.version(1).stores({ notes: 'id, title' });
    const notes = db.table<{ id: string; title?: string; body?: string }>('notes');
    const engine = new SyncEngine(store);
    await engine.register(dexieTable('notes', notes));
    assert.deepEqual(await notes.toArray(), [{ id: 'old', title: 'kept from before' }]);
    await engine.put('notes', 'n1', { title: 'new', body: 'text' });
    assert.deepEqual(await notes.get('n1'), { id: 'n1', title: 'new', body: 'text' });
    await engine.delete('old');
    assert.equal(await notes.get('old'), undefined);
    assert.deepEqual((await notes.orderBy('title').keys()), ['new']);
    db.close();
  });
});
