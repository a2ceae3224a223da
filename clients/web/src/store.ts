/**
 * The device's local store in IndexedDB, as the Rust client's `client/src/store`: its account,
 * the merged records, the mirror (the last state of each record seen from the server), the
 * outbox of local changes the server has not acknowledged yet, problems found in incoming
 * changes, the resync marker and the sync cursor.
 *
 * Every operation is one IndexedDB transaction: a local edit updates the record and queues its
 * change together; an incoming batch is merged, the mirror and the cursor moved together, and
 * only then acknowledged. An outbox change is sealed once, before its first push, and stored
 * sealed, so a retry sends the same bytes. Nothing here ever deletes a record: a resync or a
 * repair only merges, and queues what the log lacks.
 */
import { fromBase64Url, toBase64Url } from './bytes.js';
import { AccountKey, Op } from './crypto.js';
import { DeviceSecret, EpochKey, EpochKeys, Keyring } from './epochs.js';
import { Clock } from './hlc.js';
import { newId, validateCollection, validateRecordId } from './ids.js';
import type { JsonValue } from './json.js';
import { ChangePayload, RecordState } from './record.js';
import {
  REVOCATIONS_COLLECTION,
  type RevokedDevice,
  mergeRevocations,
  readRevocation,
  revocationFields,
  revocationRecordId,
} from './revocations.js';

/** Collections whose names start with this are the client's own (as in Rust), not the app's. */
export const RESERVED_PREFIX = '_lockstep.';

export interface Account {
  server: string;
  userId: string;
  deviceId: string;
  deviceName: string;
  token: string;
  key: AccountKey;
  deviceSecret: DeviceSecret;
  epochKeys: EpochKeys;
  deviceKeyRegistered: boolean;
}

export function keyring(account: Account): Keyring {
  return new Keyring(account.key, account.epochKeys);
}

export interface StoredRecord {
  recordId: string;
  collection: string;
  state: RecordState;
}

export interface Sealed {
  keyEpoch: number;
  nonce: Uint8Array;
  ciphertext: Uint8Array;
}

export interface OutboxEntry {
  seq: number;
  changeId: string;
  recordId: string;
  collection: string;
  op: number;
  hlc: bigint;
  payload: ChangePayload;
  sealed: Sealed | null;
  rejected: string | null;
}

export interface Problem {
  offset: number;
  recordId: string;
  collection: string;
  originDeviceId: string;
  kind: string;
  detail: string;
  seenAtMs: number;
}

/** An incoming change, opened (or not) by the sync layer. */
export interface Incoming {
  offset: number;
  recordId: string;
  collection: string;
  originDeviceId: string;
  content: { payload: ChangePayload } | { problem: string; detail: string };
}

export interface Applied {
  changes: number;
  changedRecords: string[];
  problems: number;
}

export class StoreError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'StoreError';
  }
}

interface RecordRow {
  recordId: string;
  collection: string;
  state: string;
  offset?: number;
}

interface OutboxRow {
  seq?: number;
  changeId: string;
  recordId: string;
  collection: string;
  op: number;
  hlc: string;
  state: string;
  rejected: string | null;
  keyEpoch: number | null;
  nonce: Uint8Array | null;
  ciphertext: Uint8Array | null;
}

const STORES = ['meta', 'records', 'mirror', 'outbox', 'problems'] as const;
type StoreName = (typeof STORES)[number];

function request<T>(req: IDBRequest<T>): Promise<T> {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error ?? new Error('IndexedDB request failed'));
  });
}

function done(tx: IDBTransaction): Promise<void> {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onabort = () => reject(tx.error ?? new StoreError('local store: the transaction was aborted'));
    tx.onerror = () => reject(tx.error ?? new StoreError('local store: the transaction failed'));
  });
}

function toOutboxEntry(row: OutboxRow): OutboxEntry {
  return {
    seq: row.seq!,
    changeId: row.changeId,
    recordId: row.recordId,
    collection: row.collection,
    op: row.op,
    hlc: BigInt(row.hlc),
    payload: new ChangePayload(RecordState.fromJsonText(row.state)),
    sealed:
      row.keyEpoch !== null && row.nonce && row.ciphertext
        ? { keyEpoch: row.keyEpoch, nonce: row.nonce, ciphertext: row.ciphertext }
        : null,
    rejected: row.rejected,
  };
}

export interface StoreOptions {
  /** A remote stamp further ahead of this clock than this is not applied (default 24 h). */
  maxClockAheadMs?: number;
  indexedDB?: IDBFactory;
}

/** One device's store: one IndexedDB database. */
export class Store {
  private constructor(
    private readonly db: IDBDatabase,
    private readonly options: StoreOptions,
  ) {}

  static async open(name: string, options: StoreOptions = {}): Promise<Store> {
    const factory = options.indexedDB ?? indexedDB;
    const open = factory.open(name, 1);
    open.onupgradeneeded = () => {
      const db = open.result;
      db.createObjectStore('meta');
      db.createObjectStore('records', { keyPath: 'recordId' }).createIndex('collection', 'collection');
      db.createObjectStore('mirror', { keyPath: 'recordId' });
      db.createObjectStore('outbox', { keyPath: 'seq', autoIncrement: true });
      db.createObjectStore('problems', { keyPath: 'offset' });
    };
    const db = await request(open);
    // Another tab upgrading later: let it.
    db.onversionchange = () => db.close();
    return new Store(db, options);
  }

  close(): void {
    this.db.close();
  }

  private tx(stores: StoreName[], mode: IDBTransactionMode = 'readonly'): IDBTransaction {
    return this.db.transaction(stores, mode);
  }

  private clock(last: string | undefined): Clock {
    return new Clock(BigInt(last ?? '0'), { maxAheadMs: this.options.maxClockAheadMs ?? 24 * 3600 * 1000 });
  }

  async getMeta(key: string): Promise<unknown> {
    return request(this.tx(['meta']).objectStore('meta').get(key));
  }

  async setMeta(key: string, value: unknown): Promise<void> {
    const tx = this.tx(['meta'], 'readwrite');
    tx.objectStore('meta').put(value, key);
    await done(tx);
  }

  // The account.

  async account(): Promise<Account | null> {
    const stored = (await this.getMeta('account')) as Record<string, unknown> | undefined;
    if (!stored) return null;
    const epochKeys = new EpochKeys();
    for (const [epoch, key] of Object.entries((stored.epochKeys as Record<string, string>) ?? {})) {
      epochKeys.insert(Number(epoch), EpochKey.fromBytes(fromBase64Url(key)));
    }
    return {
      server: stored.server as string,
      userId: stored.userId as string,
      deviceId: stored.deviceId as string,
      deviceName: stored.deviceName as string,
      token: stored.token as string,
      key: AccountKey.fromBase64(stored.key as string),
      deviceSecret: DeviceSecret.fromBase64(stored.deviceSecret as string),
      epochKeys,
      deviceKeyRegistered: Boolean(stored.deviceKeyRegistered),
    };
  }

  async saveAccount(account: Account): Promise<void> {
    const existing = (await this.getMeta('account')) as { userId?: string } | undefined;
    if (existing?.userId && existing.userId !== account.userId) {
      throw new StoreError(`this browser already holds account ${existing.userId}`);
    }
    await this.setMeta('account', {
      server: account.server,
      userId: account.userId,
      deviceId: account.deviceId,
      deviceName: account.deviceName,
      token: account.token,
      key: account.key.toBase64(),
      deviceSecret: account.deviceSecret.toBase64(),
      epochKeys: Object.fromEntries(account.epochKeys.entries().map(([epoch, key]) => [epoch, toBase64Url(key.bytes())])),
      deviceKeyRegistered: account.deviceKeyRegistered,
    });
  }

  // Local edits.

  /** Writes `fields` into a record (a new one when `recordId` is null) and queues the change; `null` removes a field. */
  async put(collection: string, recordId: string | null, fields: { [name: string]: JsonValue }): Promise<StoredRecord> {
    validateCollection(collection);
    if (collection.startsWith(RESERVED_PREFIX)) throw new StoreError(`collection ${collection} is reserved`);
    if (Object.keys(fields).length === 0) throw new StoreError('nothing to write: give at least one field');
    const id = recordId ?? newId();
    validateRecordId(id);
    return this.localChange(id, collection, Op.Upsert, (state, stamp) => state.set(fields, stamp));
  }

  /** Deletes a record (a tombstone) and queues the change. */
  async delete(recordId: string): Promise<StoredRecord> {
    const existing = await this.get(recordId);
    if (!existing || existing.state.isDeleted()) throw new StoreError(`no record ${recordId}`);
    if (existing.collection.startsWith(RESERVED_PREFIX)) throw new StoreError(`collection ${existing.collection} is reserved`);
    return this.localChange(recordId, existing.collection, Op.Delete, (state, stamp) => state.delete(stamp));
  }

  // Revocations (see revocations.ts).

  /**
   * Records that `revoked` is revoked: this device refuses to seal epoch keys to it from now on,
   * and the control record telling every device so is queued (sealed when pushed: after the
   * rotation that follows, under the new epoch).
   */
  async recordRevocation(revoked: RevokedDevice): Promise<StoredRecord> {
    await this.#keepRevoked([revoked]);
    const recordId = revocationRecordId(revoked.deviceId);
    validateRecordId(recordId);
    return this.localChange(recordId, REVOCATIONS_COLLECTION, Op.Upsert, (state, stamp) =>
      state.set(revocationFields(revoked), stamp),
    );
  }

  /** Every revocation this device knows of, its own and the log's; the list only grows. */
  async revokedDevices(): Promise<RevokedDevice[]> {
    const fromLog: RevokedDevice[] = [];
    for (const record of await this.list(REVOCATIONS_COLLECTION, true)) {
      const fields = Object.fromEntries([...record.state.fields].map(([name, field]) => [name, field.value]));
      const revoked = readRevocation(fields);
      if (revoked) fromLog.push(revoked);
    }
    return this.#keepRevoked(fromLog);
  }

  async #keepRevoked(more: RevokedDevice[]): Promise<RevokedDevice[]> {
    const stored = ((await this.getMeta('revokedDevices')) as { deviceId: string; publicKey: string; revokedInEpoch: number }[] | undefined) ?? [];
    const known = stored.map((revoked) => ({ ...revoked, publicKey: fromBase64Url(revoked.publicKey) }));
    const merged = mergeRevocations(known, more);
    const rows = merged.map((revoked) => ({ ...revoked, publicKey: toBase64Url(revoked.publicKey) }));
    if (JSON.stringify(rows) !== JSON.stringify(stored)) await this.setMeta('revokedDevices', rows);
    return merged;
  }

  private async localChange(
    recordId: string,
    collection: string,
    op: number,
    edit: (state: RecordState, stamp: { hlc: bigint; device: string }) => void,
  ): Promise<StoredRecord> {
    const account = await this.account();
    if (!account) throw new StoreError('this browser is not paired with an account yet');
    const tx = this.tx(['meta', 'records', 'outbox'], 'readwrite');
    const completed = done(tx);
    const meta = tx.objectStore('meta');
    const records = tx.objectStore('records');
    const [last, row] = await Promise.all([
      request(meta.get('hlc')) as Promise<string | undefined>,
      request(records.get(recordId)) as Promise<RecordRow | undefined>,
    ]);
    if (row && row.collection !== collection) {
      tx.abort();
      await completed.catch(() => undefined);
      throw new StoreError(`record ${recordId} is in collection ${row.collection}, not ${collection}`);
    }
    const state = row ? RecordState.fromJsonText(row.state) : new RecordState();
    const clock = this.clock(last);
    // Stay ahead of every stamp in the record, also one from a device whose clock runs fast.
    clock.observeHeld(state.maxHlc());
    const stamp = { hlc: clock.tick(), device: account.deviceId };
    edit(state, stamp);
    const text = state.toJsonText();
    records.put({ recordId, collection, state: text } satisfies RecordRow);
    tx.objectStore('outbox').add({
      changeId: newId(),
      recordId,
      collection,
      op,
      hlc: stamp.hlc.toString(),
      state: text,
      rejected: null,
      keyEpoch: null,
      nonce: null,
      ciphertext: null,
    } satisfies OutboxRow);
    meta.put(clock.last().toString(), 'hlc');
    await completed;
    return { recordId, collection, state };
  }

  async get(recordId: string): Promise<StoredRecord | null> {
    const row = (await request(this.tx(['records']).objectStore('records').get(recordId))) as RecordRow | undefined;
    return row ? { recordId, collection: row.collection, state: RecordState.fromJsonText(row.state) } : null;
  }

  /** The records of a collection (every collection when null), deleted ones only when asked. */
  async list(collection: string | null, includeDeleted = false): Promise<StoredRecord[]> {
    const store = this.tx(['records']).objectStore('records');
    const rows = (await request(
      collection === null ? store.getAll() : store.index('collection').getAll(collection),
    )) as RecordRow[];
    return rows
      .map((row) => ({ recordId: row.recordId, collection: row.collection, state: RecordState.fromJsonText(row.state) }))
      .filter((record) => includeDeleted || !record.state.isDeleted());
  }

  // The outbox.

  async outbox(includeRejected = false): Promise<OutboxEntry[]> {
    const rows = (await request(this.tx(['outbox']).objectStore('outbox').getAll())) as OutboxRow[];
    return rows.filter((row) => includeRejected || row.rejected === null).map(toOutboxEntry);
  }

  async outboxLength(): Promise<number> {
    return (await this.outbox()).length;
  }

  /**
   * The oldest pending changes, each sealed: those not sealed yet are sealed now under the
   * newest epoch held and stored so, in one transaction, before anything is sent.
   */
  async sealedOutboxBatch(limit: number): Promise<(OutboxEntry & { sealed: Sealed })[]> {
    const account = await this.account();
    if (!account) throw new StoreError('this browser is not paired with an account yet');
    const ring = keyring(account);
    const epoch = account.epochKeys.newest();
    const tx = this.tx(['outbox'], 'readwrite');
    const completed = done(tx);
    const outbox = tx.objectStore('outbox');
    const rows = ((await request(outbox.getAll())) as OutboxRow[]).filter((row) => row.rejected === null).slice(0, limit);
    for (const row of rows) {
      if (row.keyEpoch !== null && row.nonce && row.ciphertext) continue;
      const binding = { userId: account.userId, recordId: row.recordId, collection: row.collection, op: row.op, keyEpoch: epoch };
      const plaintext = new ChangePayload(RecordState.fromJsonText(row.state)).encode();
      const sealed = ring.seal(binding, plaintext);
      row.keyEpoch = epoch;
      row.nonce = sealed.nonce;
      row.ciphertext = sealed.ciphertext;
      outbox.put(row);
    }
    await completed;
    return rows.map(toOutboxEntry) as (OutboxEntry & { sealed: Sealed })[];
  }

  /** Forgets the sealed form of pending changes sealed under an epoch older than `epoch` (the server refused it). */
  async unsealOlderThan(epoch: number): Promise<void> {
    const tx = this.tx(['outbox'], 'readwrite');
    const completed = done(tx);
    const outbox = tx.objectStore('outbox');
    for (const row of (await request(outbox.getAll())) as OutboxRow[]) {
      if (row.rejected === null && row.keyEpoch !== null && row.keyEpoch < epoch) {
        outbox.put({ ...row, keyEpoch: null, nonce: null, ciphertext: null });
      }
    }
    await completed;
  }

  async outboxDone(seqs: number[]): Promise<void> {
    if (!seqs.length) return;
    const tx = this.tx(['outbox'], 'readwrite');
    for (const seq of seqs) tx.objectStore('outbox').delete(seq);
    await done(tx);
  }

  /** Keeps a change the server refused for good, out of the way, with the reason. */
  async outboxReject(seq: number, reason: string): Promise<void> {
    const tx = this.tx(['outbox'], 'readwrite');
    const completed = done(tx);
    const outbox = tx.objectStore('outbox');
    const row = (await request(outbox.get(seq))) as OutboxRow | undefined;
    if (row) outbox.put({ ...row, rejected: reason });
    await completed;
  }

  // Incoming changes.

  async cursor(): Promise<number | null> {
    const cursor = await this.getMeta('cursor');
    return typeof cursor === 'number' ? cursor : null;
  }

  /**
   * Merges a batch of consecutive incoming changes into records and mirror and moves the
   * cursor past them, in one transaction. A batch that skips offsets is refused whole.
   */
  async apply(batch: Incoming[]): Promise<Applied> {
    const applied: Applied = { changes: 0, changedRecords: [], problems: 0 };
    const last = batch[batch.length - 1];
    if (!last) return applied;
    const tx = this.tx(['meta', 'records', 'mirror', 'problems'], 'readwrite');
    const completed = done(tx);
    const meta = tx.objectStore('meta');
    const cursor = (await request(meta.get('cursor'))) as number | undefined;
    let expected = cursor ?? batch[0]!.offset;
    for (const incoming of batch) {
      if (incoming.offset > expected) {
        tx.abort();
        await completed.catch(() => undefined);
        throw new StoreError(
          `the server sent offset ${incoming.offset} where offset ${expected} was due: nothing of the batch was applied`,
        );
      }
      expected = Math.max(expected, incoming.offset + 1);
    }
    const clock = this.clock((await request(meta.get('hlc'))) as string | undefined);
    const problems = tx.objectStore('problems');
    const fileProblem = (incoming: Incoming, kind: string, detail: string) => {
      applied.problems += 1;
      problems.put({
        offset: incoming.offset,
        recordId: incoming.recordId,
        collection: incoming.collection,
        originDeviceId: incoming.originDeviceId,
        kind,
        detail,
        seenAtMs: Date.now(),
      } satisfies Problem);
    };
    for (const incoming of batch) {
      applied.changes += 1;
      if ('problem' in incoming.content) {
        fileProblem(incoming, incoming.content.problem, incoming.content.detail);
        continue;
      }
      const state = incoming.content.payload.state;
      try {
        clock.observe(state.maxHlc());
      } catch (error) {
        fileProblem(incoming, 'clock-ahead', error instanceof Error ? error.message : String(error));
        continue;
      }
      const records = tx.objectStore('records');
      const local = (await request(records.get(incoming.recordId))) as RecordRow | undefined;
      if (local && local.collection !== incoming.collection) {
        fileProblem(incoming, 'collection-conflict', `this device holds the record in collection ${local.collection}`);
        continue;
      }
      const record = local ? RecordState.fromJsonText(local.state) : new RecordState();
      if (record.merge(state)) {
        applied.changedRecords.push(incoming.recordId);
        records.put({ recordId: incoming.recordId, collection: incoming.collection, state: record.toJsonText() } satisfies RecordRow);
      }
      const mirrors = tx.objectStore('mirror');
      const mirrored = (await request(mirrors.get(incoming.recordId))) as RecordRow | undefined;
      const mirror = mirrored ? RecordState.fromJsonText(mirrored.state) : new RecordState();
      mirror.merge(state);
      mirrors.put({
        recordId: incoming.recordId,
        collection: incoming.collection,
        state: mirror.toJsonText(),
        offset: incoming.offset,
      } satisfies RecordRow);
    }
    meta.put(clock.last().toString(), 'hlc');
    // A redelivery of offsets already applied never moves the cursor back.
    meta.put(Math.max(cursor ?? 0, last.offset + 1), 'cursor');
    await completed;
    return applied;
  }

  async problems(): Promise<Problem[]> {
    return (await request(this.tx(['problems']).objectStore('problems').getAll())) as Problem[];
  }

  // Resync and repair: nothing local is deleted.

  /** The server's log starts after this device's cursor (history expired) or lost changes: read it again from `logStart`. */
  async beginResync(reason: string, logStart: number): Promise<void> {
    const tx = this.tx(['meta'], 'readwrite');
    tx.objectStore('meta').put(logStart, 'cursor');
    tx.objectStore('meta').put({ reason, logStart }, 'resync');
    await done(tx);
  }

  async pendingResync(): Promise<{ reason: string; logStart: number | null } | null> {
    return ((await this.getMeta('resync')) as { reason: string; logStart: number | null } | undefined) ?? null;
  }

  /** Asks for a repair from the log's start (the cursor is past the log's end). */
  async requestRepair(reason: string): Promise<void> {
    await this.setMeta('resync', { reason, logStart: null });
  }

  /**
   * Ends a resync once caught up: every record whose local state holds writes the log (the
   * mirror) lacks is queued again, whole, so that other devices get it back. Returns how many.
   */
  async finishResync(): Promise<number | null> {
    if (!(await this.pendingResync())) return null;
    const account = await this.account();
    if (!account) throw new StoreError('this browser is not paired with an account yet');
    const tx = this.tx(['meta', 'records', 'mirror', 'outbox'], 'readwrite');
    const completed = done(tx);
    const records = (await request(tx.objectStore('records').getAll())) as RecordRow[];
    const clock = this.clock((await request(tx.objectStore('meta').get('hlc'))) as string | undefined);
    let queued = 0;
    for (const row of records) {
      const mirrored = (await request(tx.objectStore('mirror').get(row.recordId))) as RecordRow | undefined;
      const mirror = mirrored ? RecordState.fromJsonText(mirrored.state) : new RecordState();
      const state = RecordState.fromJsonText(row.state);
      if (!mirror.clone().merge(state)) continue;
      queued += 1;
      tx.objectStore('outbox').add({
        changeId: newId(),
        recordId: row.recordId,
        collection: row.collection,
        op: state.isDeleted() ? Op.Delete : Op.Upsert,
        hlc: clock.tick().toString(),
        state: row.state,
        rejected: null,
        keyEpoch: null,
        nonce: null,
        ciphertext: null,
      } satisfies OutboxRow);
    }
    tx.objectStore('meta').put(clock.last().toString(), 'hlc');
    tx.objectStore('meta').delete('resync');
    await completed;
    return queued;
  }
}
