/**
 * The sync engine, as the Rust client's `client/src/sync`: pairing, key epochs, pushing the
 * outbox (sealed once, so a retry is byte-identical), receiving with Subscribe (merge, then
 * Ack), resync and repair without deleting anything, and a live loop that reconnects with
 * backoff. It reports its status in words a person understands, and tells the app's tables
 * (adapters) which records changed.
 */
import {
  DeviceSecret,
  EpochKey,
  EpochKeys,
  type SealedCopy,
  deviceKeyProof,
  openEpochKey,
  sealToDevices,
  verifyDeviceKey,
} from './epochs.js';
import type { Device } from './gen/lockstep/v1/accounts_pb.js';
import type { DeviceKey } from './gen/lockstep/v1/keys_pb.js';
import { GrpcStatus } from './grpc-web.js';
import { ResyncReason, type DeliveredChange } from './gen/lockstep/v1/sync_pb.js';
import type { JsonValue } from './json.js';
import { decodePairingCode } from './pairing.js';
import { ChangePayload, PayloadError } from './record.js';
import { isRevoked } from './revocations.js';
import { type Account, type Incoming, type StoredRecord, Store, keyring } from './store.js';
import { RpcError, Transport } from './transport.js';

/** An app's own table, kept up to date with one collection (e.g. a Dexie table). */
export interface TableAdapter {
  readonly collection: string;
  /** A record changed (by this device or another): `fields` is null when it was deleted. */
  apply(recordId: string, fields: { [name: string]: JsonValue } | null): Promise<void> | void;
}

export type SyncState = 'unpaired' | 'offline' | 'connecting' | 'syncing' | 'live' | 'stopped' | 'error';

export interface SyncStatus {
  state: SyncState;
  /** What is happening, in plain words. */
  message: string;
  /** Local edits not on the server yet. */
  pending: number;
  /** Incoming changes this device could not apply. */
  problems: number;
  /** Local edits the server refused, with why. */
  rejected: string[];
  lastSyncedAtMs: number | null;
}

export interface SyncReport {
  pushed: number;
  received: number;
  changedRecords: number;
  problems: number;
  requeued: number;
}

/** Pairs this browser with the account of a `LOCKSTEP1:` code (pasted or scanned). */
export async function pair(store: Store, codeText: string, deviceName: string, fetchImpl?: typeof fetch): Promise<Account> {
  const code = decodePairingCode(codeText);
  if (await store.account()) throw new Error('this browser is already paired with an account');
  const transport = new Transport(code.server, null, fetchImpl ? { fetch: fetchImpl } : {});
  const redeemed = await transport.redeem(code.ticket, deviceName);
  const account: Account = {
    server: code.server,
    userId: redeemed.userId,
    deviceId: redeemed.deviceId,
    deviceName,
    token: redeemed.deviceToken,
    key: code.key,
    deviceSecret: DeviceSecret.generate(),
    epochKeys: new EpochKeys(),
    deviceKeyRegistered: false,
  };
  await store.saveAccount(account);
  return account;
}

/** What a key sync did (the Rust client's `KeySync`). */
export interface KeySync {
  /** This device registered its public key now. */
  registered: boolean;
  /** Epoch keys received and opened. */
  received: number;
  /** The epoch this device started (after a revocation). */
  startedEpoch: number | null;
  /** Sealed copies shared with devices that lacked them. */
  shared: number;
  /** The account's current epoch, as the server says. */
  currentEpoch: number;
  /** The newest epoch this device holds. */
  heldEpoch: number;
  /** The server has the Keys service. */
  supported: boolean;
}

/** StartKeyEpoch attempts when another device rotates or a device appears at the same time. */
const ROTATION_ATTEMPTS = 3;
/** Sealed keys per ShareEpochKeys call (the server takes up to 1,024). */
const SHARE_CHUNK = 512;

function backoffMs(attempt: number): number {
  const cap = Math.min(30_000, 250 * 2 ** Math.min(attempt, 7));
  return cap / 2 + Math.random() * (cap / 2);
}

const CHANGED = 'lockstep-changed';

export class SyncEngine extends EventTarget {
  readonly store: Store;
  #adapters = new Map<string, TableAdapter[]>();
  #status: SyncStatus = {
    state: 'stopped',
    message: 'not syncing',
    pending: 0,
    problems: 0,
    rejected: [],
    lastSyncedAtMs: null,
  };
  #live: AbortController | null = null;
  #wake: (() => void) | null = null;
  #busy: Promise<unknown> = Promise.resolve();
  #channel: BroadcastChannel | null = null;
  readonly #fetch: typeof fetch | undefined;

  constructor(store: Store, options: { fetch?: typeof fetch; channelName?: string } = {}) {
    super();
    this.store = store;
    this.#fetch = options.fetch;
    if (typeof BroadcastChannel !== 'undefined' && options.channelName) {
      // Another tab or the service worker synced: tell this page's tables.
      this.#channel = new BroadcastChannel(options.channelName);
      this.#channel.onmessage = (event: MessageEvent<{ recordIds?: string[] }>) => {
        void this.#notify(event.data.recordIds ?? [], false);
      };
    }
  }

  /** Registers an app's table: it gets every change of its collection, from now on and (once) all records held. */
  async register(adapter: TableAdapter): Promise<void> {
    const list = this.#adapters.get(adapter.collection) ?? [];
    list.push(adapter);
    this.#adapters.set(adapter.collection, list);
    for (const record of await this.store.list(adapter.collection, true)) {
      await adapter.apply(record.recordId, record.state.visible());
    }
  }

  get status(): SyncStatus {
    return { ...this.#status };
  }

  async #setStatus(state: SyncState, message: string): Promise<void> {
    const [pending, problems, outbox] = await Promise.all([
      this.store.outboxLength(),
      this.store.problems(),
      this.store.outbox(true),
    ]);
    this.#status = {
      ...this.#status,
      state,
      message,
      pending,
      problems: problems.length,
      rejected: outbox.filter((entry) => entry.rejected).map((entry) => `${entry.recordId}: ${entry.rejected}`),
      lastSyncedAtMs: state === 'live' ? Date.now() : this.#status.lastSyncedAtMs,
    };
    this.dispatchEvent(new CustomEvent('status', { detail: this.status }));
  }

  async #notify(recordIds: string[], broadcast: boolean): Promise<void> {
    const records: StoredRecord[] = [];
    for (const recordId of new Set(recordIds)) {
      const record = await this.store.get(recordId);
      if (record) records.push(record);
    }
    for (const record of records) {
      for (const adapter of this.#adapters.get(record.collection) ?? []) {
        await adapter.apply(record.recordId, record.state.visible());
      }
    }
    if (records.length) this.dispatchEvent(new CustomEvent(CHANGED, { detail: records.map((r) => r.recordId) }));
    if (broadcast && records.length) this.#channel?.postMessage({ recordIds: records.map((r) => r.recordId) });
  }

  onChange(listener: (recordIds: string[]) => void): void {
    this.addEventListener(CHANGED, (event) => listener((event as CustomEvent<string[]>).detail));
  }

  onStatus(listener: (status: SyncStatus) => void): void {
    this.addEventListener('status', (event) => listener((event as CustomEvent<SyncStatus>).detail));
  }

  async #account(): Promise<Account> {
    const account = await this.store.account();
    if (!account) throw new Error('this browser is not paired with an account yet: paste a pairing code');
    return account;
  }

  async #transport(): Promise<[Account, Transport]> {
    const account = await this.#account();
    return [account, new Transport(account.server, account.token, this.#fetch ? { fetch: this.#fetch } : {})];
  }

  // Local edits: written at once, pushed when the server can be reached.

  async put(collection: string, recordId: string | null, fields: { [name: string]: JsonValue }): Promise<StoredRecord> {
    const record = await this.store.put(collection, recordId, fields);
    await this.#afterLocalEdit(record.recordId);
    return record;
  }

  async delete(recordId: string): Promise<StoredRecord> {
    const record = await this.store.delete(recordId);
    await this.#afterLocalEdit(recordId);
    return record;
  }

  async #afterLocalEdit(recordId: string): Promise<void> {
    await this.#notify([recordId], true);
    await this.#setStatus(this.#status.state, this.#status.message);
    this.#wake?.();
  }

  // Keys (as the Rust client's `sync/keys.rs`).

  /**
   * Brings this device's keys up to date with the account: registers its public key, fetches
   * and opens every epoch key sealed to it (a copy that does not open is reported, so that the
   * server forgets it and another device shares it again), starts the next epoch when a
   * revocation made one due, and, with `share`, seals the epochs it holds to devices that lack
   * them. Sharing waits until the log was read: a revocation record waiting in it is not known
   * before. A server without the Keys service (older than key rotation) is left alone.
   */
  async syncKeys(options: { share?: boolean } = {}): Promise<KeySync> {
    const [account, transport] = await this.#transport();
    const outcome: KeySync = { registered: false, received: 0, startedEpoch: null, shared: 0, currentEpoch: 0, heldEpoch: 0, supported: true };
    try {
      if (!account.deviceKeyRegistered) {
        const publicKey = account.deviceSecret.publicKey();
        await transport.registerDeviceKey(publicKey, deviceKeyProof(account.key, account.userId, account.deviceId, publicKey));
        account.deviceKeyRegistered = true;
        await this.store.saveAccount(account);
        outcome.registered = true;
      }
      const rotationDue = await this.#fetchEpochKeys(account, transport, outcome);
      if (rotationDue || (await this.#revocationNeedsEpoch(account, outcome.currentEpoch))) {
        await this.#rotate(account, transport, outcome);
      }
      if (options.share) await this.#shareMissing(account, transport, outcome);
    } catch (error) {
      if (error instanceof RpcError && error.code === GrpcStatus.Unimplemented) {
        outcome.supported = false;
        outcome.currentEpoch = account.epochKeys.newest();
      } else throw error;
    }
    outcome.heldEpoch = account.epochKeys.newest();
    return outcome;
  }

  /** Fetches and opens the epoch keys sealed to this device it does not hold yet; returns whether a rotation is due. */
  async #fetchEpochKeys(account: Account, transport: Transport, outcome: KeySync): Promise<boolean> {
    let sinceEpoch = 0;
    let unopened: number[] = [];
    for (let round = 0; round < 1024; round++) {
      const reported = unopened.length > 0;
      const answer = await transport.epochKeys(sinceEpoch, unopened);
      unopened = [];
      let opened = 0;
      for (const sealed of answer.sealedKeys) {
        sinceEpoch = Math.max(sinceEpoch, sealed.epoch);
        if (sealed.deviceId !== account.deviceId || sealed.epoch < 2 || account.epochKeys.get(sealed.epoch)) continue;
        try {
          const key = openEpochKey(
            account.key,
            account.deviceSecret,
            { userId: account.userId, deviceId: account.deviceId, epoch: sealed.epoch },
            sealed.sealed,
          );
          account.epochKeys.insert(sealed.epoch, key);
          opened += 1;
        } catch {
          // Not made with this account's key: never used; reported for another device to share again.
          console.warn(`reporting epoch ${sealed.epoch}'s key (sealed by ${sealed.sealedByDeviceId}): it does not open or verify`);
          unopened.push(sealed.epoch);
        }
      }
      if (opened) {
        outcome.received += opened;
        await this.store.saveAccount(account);
      }
      outcome.currentEpoch = answer.currentEpoch;
      // One more call reports the copies that did not open (the server then forgets them).
      const done = !answer.more || answer.sealedKeys.length === 0;
      if (done && (unopened.length === 0 || reported)) return answer.rotationDue;
    }
    throw new Error('the server kept sending epoch keys');
  }

  /** Whether a revocation this device knows of has no epoch after it yet (asks nothing of the server). */
  async #revocationNeedsEpoch(account: Account, serverEpoch: number): Promise<boolean> {
    const newestKnown = Math.max(serverEpoch, account.epochKeys.newest());
    return (await this.store.revokedDevices()).some((revoked) => revoked.revokedInEpoch >= newestKnown);
  }

  /** The listed devices this device must never seal an epoch key to: those the log or this device revoked. */
  async #refused(account: Account, devices: DeviceKey[]): Promise<Set<string>> {
    const revoked = await this.store.revokedDevices();
    const refused = devices.filter(
      (device) => device.deviceId !== account.deviceId && isRevoked(revoked, device.deviceId, device.publicKey),
    );
    for (const device of refused) console.warn(`the server lists device ${device.deviceId}, which this account revoked: no epoch key is sealed to it`);
    return new Set(refused.map((device) => device.deviceId));
  }

  /** Starts the next epoch with a fresh random key sealed to every active device with a registered key, except revoked ones. */
  async #rotate(account: Account, transport: Transport, outcome: KeySync): Promise<void> {
    for (let attempt = 0; attempt < ROTATION_ATTEMPTS; attempt++) {
      const listed = await transport.listDeviceKeys();
      if (!listed.rotationDue && !(await this.#revocationNeedsEpoch(account, listed.currentEpoch))) return;
      const epoch = listed.currentEpoch + 1;
      const key = EpochKey.generate();
      const refused = await this.#refused(account, listed.devices);
      const sealedKeys = sealToDevices(
        account.key,
        account.userId,
        epoch,
        key,
        listed.devices.filter((device) => !refused.has(device.deviceId)),
      );
      try {
        await transport.startKeyEpoch(epoch, sealedKeys);
      } catch (error) {
        if (error instanceof RpcError && error.code === GrpcStatus.FailedPrecondition) {
          // Another device rotated first, or the device set changed meanwhile.
          const rotationDue = await this.#fetchEpochKeys(account, transport, outcome);
          if (!rotationDue && !(await this.#revocationNeedsEpoch(account, outcome.currentEpoch))) return;
          continue;
        }
        throw error;
      }
      account.epochKeys.insert(epoch, key);
      await this.store.saveAccount(account);
      outcome.startedEpoch = epoch;
      outcome.currentEpoch = epoch;
      return;
    }
    throw new Error(
      `the key rotation did not go through after ${ROTATION_ATTEMPTS} attempts (devices changing meanwhile?); the next sync tries again`,
    );
  }

  /** Seals the epochs this device holds to each device that lacks them (a device paired after a rotation). */
  async #shareMissing(account: Account, transport: Transport, outcome: KeySync): Promise<void> {
    const listed = await transport.listDeviceKeys();
    const refused = await this.#refused(account, listed.devices);
    const sealedKeys: SealedCopy[] = [];
    for (const device of listed.devices) {
      const held = device.missingEpochs.filter((epoch) => account.epochKeys.get(epoch));
      if (device.deviceId === account.deviceId || !device.publicKey.length || !held.length || refused.has(device.deviceId)) continue;
      for (const epoch of held) {
        try {
          sealedKeys.push(...sealToDevices(account.key, account.userId, epoch, account.epochKeys.get(epoch)!, [device]));
        } catch (error) {
          console.warn(`not sharing epoch keys with device ${device.deviceId}: ${error instanceof Error ? error.message : String(error)}`);
          break;
        }
      }
    }
    for (let start = 0; start < sealedKeys.length; start += SHARE_CHUNK) {
      const answer = await transport.shareEpochKeys(sealedKeys.slice(start, start + SHARE_CHUNK));
      outcome.shared += answer.stored;
    }
  }

  // Devices.

  /** The account's devices, as the server lists them (revoked ones included, with when). */
  async devices(): Promise<Device[]> {
    const [, transport] = await this.#transport();
    return (await transport.listDevices()).devices;
  }

  /**
   * Revokes another device of the account, as the Rust client's `Syncer::revoke`: the
   * revocation is recorded in the log (a control record with the device's registered key),
   * the server revokes it (its token stops working), then this device starts the next key
   * epoch sealed to every remaining device and pushes the record under it: what is written
   * afterwards is sealed with a key the revoked device never gets.
   */
  async revoke(deviceId: string): Promise<{ keys: KeySync; pushed: number }> {
    const run = this.#busy.then(async () => {
      const [account, transport] = await this.#transport();
      if (deviceId === account.deviceId) throw new Error('this is this device: to leave, revoke it from another device');
      let listed;
      try {
        listed = await transport.listDeviceKeys();
      } catch (error) {
        if (!(error instanceof RpcError && error.code === GrpcStatus.Unimplemented)) throw error;
        // A server from before key rotation: nothing to seal, nothing to record against.
        await transport.revokeDevice(deviceId);
        return { keys: await this.syncKeys({ share: true }), pushed: 0 };
      }
      const device = listed.devices.find((listedDevice) => listedDevice.deviceId === deviceId);
      let publicKey: Uint8Array = new Uint8Array();
      if (device?.publicKey.length) {
        try {
          // The key the server lists counts only with the account key's proof.
          publicKey = verifyDeviceKey(account.key, account.userId, deviceId, device.publicKey, device.proof);
        } catch {
          publicKey = new Uint8Array();
        }
      }
      const revoked = { deviceId, publicKey, revokedInEpoch: Math.max(listed.currentEpoch, account.epochKeys.newest()) };
      if (device) {
        // Recorded before the server hears of it: this device refuses it from now on.
        await this.store.recordRevocation(revoked);
        await transport.revokeDevice(deviceId);
      } else {
        // Unknown or revoked already: the server says which; record only a real device.
        await transport.revokeDevice(deviceId);
        await this.store.recordRevocation(revoked);
      }
      const keys = await this.syncKeys({ share: true });
      const pushed = await this.push();
      await this.#setStatus(this.#status.state, this.#status.message);
      return { keys, pushed };
    });
    this.#busy = run.catch(() => undefined);
    return run;
  }

  // Push.

  /** Pushes the outbox, oldest first; returns how many changes the server took. */
  async push(): Promise<number> {
    const [, transport] = await this.#transport();
    let pushed = 0;
    let refreshedKeys = false;
    for (;;) {
      const entries = await this.store.sealedOutboxBatch(100);
      if (!entries.length) return pushed;
      let response;
      try {
        response = await transport.push(
          entries.map((entry) => ({
            changeId: entry.changeId,
            recordId: entry.recordId,
            collection: entry.collection,
            op: entry.op,
            hlc: entry.hlc,
            keyEpoch: entry.sealed.keyEpoch,
            nonce: entry.sealed.nonce,
            ciphertext: entry.sealed.ciphertext,
          })),
        );
      } catch (error) {
        if (error instanceof RpcError && error.code === GrpcStatus.FailedPrecondition && !refreshedKeys) {
          // Sealed under an epoch older than the account's: fetch the new keys, seal again.
          refreshedKeys = true;
          await this.syncKeys();
          await this.store.unsealOlderThan((await this.#account()).epochKeys.newest());
          continue;
        }
        throw error;
      }
      const acknowledged: number[] = [];
      let stalled: string | null = null;
      for (const [index, entry] of entries.entries()) {
        const result = response.results[index];
        if (result?.result.case === 'offset') {
          acknowledged.push(entry.seq);
        } else if (result?.result.case === 'error' && result.result.value.retryable) {
          stalled = result.result.value.message;
          break;
        } else if (result?.result.case === 'error') {
          await this.store.outboxReject(entry.seq, result.result.value.message);
        } else {
          stalled = 'the server sent no result';
          break;
        }
      }
      await this.store.outboxDone(acknowledged);
      pushed += acknowledged.length;
      if (stalled) throw new RpcError('Push', GrpcStatus.Unavailable, stalled, transport.server);
    }
  }

  // Receive.

  #open(account: Account, delivered: DeliveredChange): Incoming {
    const change = delivered.change;
    const base = {
      offset: Number(delivered.offset),
      recordId: change?.recordId ?? '',
      collection: change?.collection ?? '',
      originDeviceId: delivered.originDeviceId,
    };
    if (delivered.undecodable || !change) {
      return { ...base, content: { problem: 'undecodable', detail: delivered.undecodable || 'no change' } };
    }
    let plaintext: Uint8Array;
    try {
      plaintext = keyring(account).open(
        { userId: account.userId, recordId: change.recordId, collection: change.collection, op: change.op, keyEpoch: change.keyEpoch },
        change.nonce,
        change.ciphertext,
      );
    } catch (error) {
      return { ...base, content: { problem: 'undecryptable', detail: error instanceof Error ? error.message : String(error) } };
    }
    try {
      return { ...base, content: { payload: ChangePayload.decode(plaintext) } };
    } catch (error) {
      const kind = error instanceof PayloadError ? error.kind : 'malformed';
      return { ...base, content: { problem: kind, detail: error instanceof Error ? error.message : String(error) } };
    }
  }

  /**
   * Subscribes from the cursor and applies what arrives (merge, then Ack) until caught up with
   * the log end, or, with `live`, until `signal` aborts. While live, local edits are pushed as
   * they are made.
   */
  async receive(options: { live: boolean; signal?: AbortSignal; onCaughtUp?: () => void }): Promise<SyncReport> {
    const report: SyncReport = { pushed: 0, received: 0, changedRecords: 0, problems: 0, requeued: 0 };
    const [, transport] = await this.#transport();
    const controller = new AbortController();
    const stop = () => controller.abort();
    options.signal?.addEventListener('abort', stop);
    let repairing = (await this.store.pendingResync())?.logStart === null;
    let sharedKeys = false;
    let stream: AsyncGenerator<import('./gen/lockstep/v1/sync_pb.js').SubscribeResponse>;
    const subscribe = async () => {
      const cursor = await this.store.cursor();
      return transport.subscribe(repairing ? 0n : cursor === null ? undefined : BigInt(cursor), repairing, {
        signal: controller.signal,
      });
    };
    // Local edits made while live go out at once.
    let pushing: Promise<void> = Promise.resolve();
    const pushNow = () => {
      pushing = pushing
        .then(async () => {
          report.pushed += await this.push();
          await this.#setStatus(this.#status.state, this.#status.message);
        })
        .catch((error: unknown) => {
          controller.abort(error);
        });
    };
    if (options.live) this.#wake = pushNow;
    try {
      stream = await subscribe();
      for (;;) {
        let next: IteratorResult<import('./gen/lockstep/v1/sync_pb.js').SubscribeResponse>;
        try {
          next = await stream.next();
        } catch (error) {
          if (error instanceof RpcError && error.code === GrpcStatus.OutOfRange && !repairing) {
            // This device's position is past the log end: repair from the start, delete nothing.
            await this.store.requestRepair('cursor-past-log-end');
            repairing = true;
            stream = await subscribe();
            continue;
          }
          throw error;
        }
        if (next.done) {
          if (controller.signal.aborted && controller.signal.reason instanceof Error) throw controller.signal.reason;
          if (options.signal?.aborted) return report;
          throw new RpcError('Subscribe', GrpcStatus.Unavailable, 'the stream ended', transport.server);
        }
        const event = next.value.event;
        if (repairing && event.case !== 'resync') {
          // A server that does not know `repair` started where asked: at 0.
          await this.store.beginResync('log-lost', 0);
          repairing = false;
        }
        if (event.case === 'changes') {
          const changes = event.value.changes;
          const last = changes[changes.length - 1];
          if (!last) continue;
          let account = await this.#account();
          if (changes.some((change) => (change.change?.keyEpoch ?? 1) > account.epochKeys.newest())) {
            await this.syncKeys();
            account = await this.#account();
          }
          const applied = await this.store.apply(changes.map((change) => this.#open(account, change)));
          // Committed locally: now the server may forget it for this device.
          await transport.ack(last.offset);
          report.received += applied.changes;
          report.changedRecords += applied.changedRecords.length;
          report.problems += applied.problems;
          await this.#notify(applied.changedRecords, true);
          await this.#setStatus('syncing', `receiving changes (at ${(await this.store.cursor()) ?? 0})`);
        } else if (event.case === 'heartbeat') {
          const cursor = (await this.store.cursor()) ?? 0;
          if (BigInt(cursor) >= event.value.logEndOffset) {
            const requeued = await this.store.finishResync();
            if (requeued) {
              report.requeued += requeued;
              pushNow();
            }
            await pushing;
            if (!options.live) return report;
            if (!sharedKeys) {
              // The log is read (its revocation records too): now keys may go to devices that lack them.
              sharedKeys = true;
              await this.syncKeys({ share: true });
            }
            await this.#setStatus('live', 'up to date');
            options.onCaughtUp?.();
          }
        } else if (event.case === 'resync') {
          repairing = false;
          const reason = event.value.reason === ResyncReason.LOG_LOST ? 'log-lost' : 'history-expired';
          await this.store.beginResync(reason, Number(event.value.logStartOffset));
          await this.#setStatus('syncing', 'the server asked for a full re-read; local data is kept');
        }
      }
    } finally {
      if (this.#wake === pushNow) this.#wake = null;
      options.signal?.removeEventListener('abort', stop);
      controller.abort();
      await pushing;
    }
  }

  /** Push, receive until caught up, push what arrived meanwhile. One at a time. */
  async syncOnce(): Promise<SyncReport> {
    const run = this.#busy.then(async () => {
      await this.#setStatus('syncing', 'syncing');
      try {
        await this.syncKeys();
        const pushed = await this.push();
        const report = await this.receive({ live: false });
        await this.syncKeys({ share: true });
        report.pushed += pushed + (await this.push());
        await this.#setStatus('live', 'up to date');
        return report;
      } catch (error) {
        await this.#setStatus(...this.#describe(error));
        throw error;
      }
    });
    this.#busy = run.catch(() => undefined);
    return run;
  }

  #describe(error: unknown): [SyncState, string] {
    const message = error instanceof Error ? error.message : String(error);
    if (error instanceof RpcError && error.transient) {
      return ['offline', `offline: ${message}; your edits are kept on this device and sent when it is back`];
    }
    return ['error', `sync stopped: ${message}`];
  }

  /** Syncs continuously while the page is open: reconnects with backoff, pushes edits as they are made. */
  start(): void {
    if (this.#live) return;
    const controller = new AbortController();
    this.#live = controller;
    void (async () => {
      let attempt = 0;
      while (!controller.signal.aborted) {
        try {
          await this.#setStatus('connecting', 'connecting to the server');
          await this.syncKeys();
          await this.push();
          await this.receive({
            live: true,
            signal: controller.signal,
            onCaughtUp: () => {
              attempt = 0;
            },
          });
        } catch (error) {
          if (controller.signal.aborted) break;
          const [state, message] = this.#describe(error);
          await this.#setStatus(state, message);
          if (state === 'error' && error instanceof RpcError && error.code === GrpcStatus.Unauthenticated) break;
          const delay = backoffMs(attempt++);
          // A local edit or coming back online retries at once.
          await new Promise<void>((resolve) => {
            const timer = setTimeout(resolve, delay);
            this.#wake = () => {
              clearTimeout(timer);
              resolve();
            };
            controller.signal.addEventListener('abort', () => resolve(), { once: true });
          });
          this.#wake = null;
        }
      }
      await this.#setStatus('stopped', 'not syncing');
    })();
  }

  stop(): void {
    this.#live?.abort();
    this.#live = null;
  }

  /** Retry now (e.g. the browser says it is online again). */
  retryNow(): void {
    this.#wake?.();
  }
}
