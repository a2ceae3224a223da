/** The IndexedDB store and the transport's error mapping, in Node (fake-indexeddb, a fake fetch). */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import { IDBFactory } from 'fake-indexeddb';

import {
  AccountKey,
  ChangePayload,
  DeviceSecret,
  EpochKeys,
  GrpcStatus,
  type Incoming,
  RecordState,
  RpcError,
  Store,
  Transport,
  frame,
  keyring,
} from '../src/index.js';
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
    await assert.rejects(store.put('lockstep.revocations', null, { x: 1 }), /reserved/);
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
    assert.match(offline.message, /cannot be reached/);
  });

  it('reads a message then the status from the trailers frame', async () => {
    const trailers = new TextEncoder().encode('grpc-status: 0\r\n');
    const body = new Uint8Array([...frame(new Uint8Array([0x0a, 0x02, 0x76, 0x31])), 0x80, 0, 0, 0, trailers.length, ...trailers]);
    const ok = new Transport('http://server', null, { fetch: answer(200, {}, body) });
    assert.equal((await ok.serverInfo()).serverVersion, 'v1');
  });
});
