/**
 * The notes PWA: pair by scanning the QR code of `lockstep-cli pair show` or pasting its
 * `LOCKSTEP1:` code, revoke another device (which starts a new key epoch), a notes list that works offline and
 * syncs live while open, sync status and problems in plain words, Web Push wake-ups through
 * the service worker.
 */
import { type JsonValue, RpcError, Transport, fromBase64Url, pair } from '../src/index.js';
import { COLLECTION, openEngine } from './common.js';
import { ScanError, scanPairingCode } from './scan.js';

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;

interface Note {
  id: string;
  title: string;
  body: string;
  /** Fields other devices wrote besides title and body, shown as they are. */
  extra: string;
}

const notes = new Map<string, Note>();
let pushState = 'not set up yet';

function text(value: JsonValue | undefined): string {
  return typeof value === 'string' ? value : value === undefined || value === null ? '' : JSON.stringify(value);
}

const engine = await openEngine();
Object.assign(window, { lockstep: { engine, store: engine.store, notes } });

if ('serviceWorker' in navigator) {
  navigator.serviceWorker.register('sw.js').catch((error: unknown) => {
    pushState = `no offline copy: the service worker did not register (${String(error)})`;
  });
}

function renderStatus(): void {
  const status = engine.status;
  const parts = [status.message];
  if (status.pending) parts.push(`${status.pending} edit${status.pending === 1 ? '' : 's'} waiting to be sent`);
  if (status.problems) parts.push(`${status.problems} incoming change${status.problems === 1 ? '' : 's'} could not be read (see “This device”)`);
  if (status.rejected.length) parts.push(`${status.rejected.length} edit${status.rejected.length === 1 ? ' was' : 's were'} refused by the server`);
  $('status').dataset.state = status.state;
  $('status-text').textContent = parts.join(' · ');
}

function renderList(): void {
  const list = $('list');
  const focused = document.activeElement?.closest('li')?.dataset.id;
  const sorted = [...notes.values()].sort((a, b) => a.title.localeCompare(b.title) || a.id.localeCompare(b.id));
  for (const li of [...list.children] as HTMLElement[]) {
    if (li.dataset.id !== focused && !notes.has(li.dataset.id ?? '')) li.remove();
  }
  for (const note of sorted) {
    let li = list.querySelector<HTMLLIElement>(`li[data-id="${note.id}"]`);
    if (!li) {
      li = document.createElement('li');
      li.dataset.id = note.id;
      li.innerHTML = `<input class="title" aria-label="Title" /><textarea class="body" rows="2" aria-label="Note"></textarea>
        <div class="meta"></div><div class="row"><button class="save">Save</button><button class="delete secondary">Delete</button></div>`;
      li.querySelector('.save')!.addEventListener('click', () => {
        const title = li!.querySelector<HTMLInputElement>('.title')!.value;
        const body = li!.querySelector<HTMLTextAreaElement>('.body')!.value;
        void run(engine.put(COLLECTION, note.id, { title, body }));
      });
      li.querySelector('.delete')!.addEventListener('click', () => void run(engine.delete(note.id)));
    }
    li.querySelector<HTMLElement>('.meta')!.textContent = note.extra ? `also: ${note.extra}` : '';
    if (note.id !== focused) {
      li.querySelector<HTMLInputElement>('.title')!.value = note.title;
      li.querySelector<HTMLTextAreaElement>('.body')!.value = note.body;
    }
    list.appendChild(li);
  }
}

async function renderDevice(): Promise<void> {
  const account = await engine.store.account();
  if (!account) return;
  const wake = (await engine.store.getMeta('lastWake')) as { atMs: number } | undefined;
  const rows: [string, string][] = [
    ['Device', `${account.deviceName} (${account.deviceId})`],
    ['Server', account.server],
    ['Key epoch', String(account.epochKeys.newest())],
    ['Position in the log', String((await engine.store.cursor()) ?? 0)],
    ['Wake-ups (Web Push)', pushState],
    ['Last woken', wake ? new Date(wake.atMs).toLocaleString() : 'never'],
  ];
  $('device').innerHTML = '';
  for (const [name, value] of rows) {
    const dt = document.createElement('dt');
    dt.textContent = name;
    const dd = document.createElement('dd');
    dd.textContent = value;
    $('device').append(dt, dd);
  }
  const problems = $('problems');
  problems.innerHTML = '';
  for (const problem of await engine.store.problems()) {
    const li = document.createElement('li');
    li.className = 'problem';
    li.textContent = `A change to ${problem.recordId} (from device ${problem.originDeviceId}) could not be applied: ${problem.kind}, ${problem.detail}`;
    problems.append(li);
  }
  for (const rejected of engine.status.rejected) {
    const li = document.createElement('li');
    li.className = 'problem';
    li.textContent = `The server refused an edit of ${rejected}`;
    problems.append(li);
  }
}

async function run(action: Promise<unknown>): Promise<void> {
  try {
    await action;
  } catch (error) {
    $('status-text').textContent = `could not save: ${error instanceof Error ? error.message : String(error)}`;
  }
}

/** Subscribes to Web Push with the server's VAPID key and tells the server where to wake this device. */
async function registerPush(transport: Transport): Promise<string> {
  if (!('serviceWorker' in navigator) || !('PushManager' in window)) return 'not offered by this browser';
  const info = await transport.serverInfo();
  if (!info.vapidPublicKey) return 'the server has no push key (its push worker is not set up)';
  const registration = await navigator.serviceWorker.ready;
  const subscription =
    (await registration.pushManager.getSubscription()) ??
    (await registration.pushManager.subscribe({
      userVisibleOnly: true,
      applicationServerKey: fromBase64Url(info.vapidPublicKey) as BufferSource,
    }));
  const keys = subscription.toJSON().keys ?? {};
  if (!keys.p256dh || !keys.auth) return 'the browser gave a subscription without keys';
  await transport.setWebPushTarget(subscription.endpoint, fromBase64Url(keys.p256dh), fromBase64Url(keys.auth));
  return 'on: the server wakes this app when there is something new';
}

async function showNotes(): Promise<void> {
  $('pairing').hidden = true;
  $('notes').hidden = false;
  await engine.register({
    collection: COLLECTION,
    apply(recordId, fields) {
      if (fields === null) notes.delete(recordId);
      else {
        const extra = Object.entries(fields)
          .filter(([name]) => name !== 'title' && name !== 'body')
          .map(([name, value]) => `${name}: ${text(value)}`)
          .join(' · ');
        notes.set(recordId, { id: recordId, title: text(fields.title), body: text(fields.body), extra });
      }
    },
  });
  renderList();
  engine.onChange(() => renderList());
  engine.onStatus(() => {
    renderStatus();
    void renderDevice();
  });
  $('new-note').addEventListener('submit', (event) => {
    event.preventDefault();
    const title = $<HTMLInputElement>('new-title');
    const body = $<HTMLTextAreaElement>('new-body');
    void run(
      engine.put(COLLECTION, null, { title: title.value, body: body.value }).then(() => {
        title.value = '';
        body.value = '';
      }),
    );
  });
  window.addEventListener('online', () => engine.retryNow());
  $('load-devices').addEventListener('click', () => void renderDevices());
  engine.start();
  const account = (await engine.store.account())!;
  registerPush(new Transport(account.server, account.token))
    .then((state) => (pushState = state))
    .catch((error: unknown) => {
      const said = error instanceof Error ? error.message : String(error);
      pushState = `off: ${error instanceof RpcError ? said : `this browser did not subscribe (${said}); the app syncs while it is open`}`;
    })
    .finally(() => void renderDevice());
}

/** Lists the account's devices, each other active one with a button that revokes it (after a confirmation). */
async function renderDevices(): Promise<void> {
  const message = $('devices-message');
  const account = (await engine.store.account())!;
  let devices;
  try {
    devices = await engine.devices();
  } catch (error) {
    message.textContent = `Could not list the devices: ${error instanceof Error ? error.message : String(error)}`;
    message.className = 'problem';
    message.hidden = false;
    return;
  }
  const list = $('devices');
  list.innerHTML = '';
  for (const device of devices) {
    const li = document.createElement('li');
    li.dataset.deviceId = device.deviceId;
    const label = document.createElement('span');
    label.textContent = `${device.name || 'unnamed'} (${device.deviceId})`;
    li.append(label);
    if (device.deviceId === account.deviceId) {
      label.textContent += ' · this device';
    } else if (device.revokedAtMs > 0n) {
      label.textContent += ` · revoked ${new Date(Number(device.revokedAtMs)).toLocaleString()}`;
      li.dataset.revoked = 'true';
    } else {
      const button = document.createElement('button');
      button.className = 'revoke danger';
      button.textContent = 'Revoke this device';
      button.addEventListener('click', () => void revoke(device.deviceId, device.name || device.deviceId));
      li.append(button);
    }
    list.append(li);
  }
}

async function revoke(deviceId: string, name: string): Promise<void> {
  const message = $('devices-message');
  const confirmed = window.confirm(
    `Revoke “${name}”? It stops syncing at once, and everything written from now on is sealed with a new key it never gets. ` +
      'This cannot be undone: to use it again, pair it anew.',
  );
  if (!confirmed) {
    message.textContent = `“${name}” was not revoked.`;
    message.className = '';
    message.hidden = false;
    return;
  }
  message.textContent = `Revoking “${name}”…`;
  message.className = '';
  message.hidden = false;
  try {
    const { keys } = await engine.revoke(deviceId);
    message.textContent =
      keys.startedEpoch !== null
        ? `Revoked “${name}”: it can no longer sync, and key epoch ${keys.startedEpoch} started, sealed to the remaining devices only.`
        : `Revoked “${name}”: it can no longer sync${keys.supported ? `; key epoch ${keys.currentEpoch} is in force` : ' (this server does not rotate keys)'}.`;
  } catch (error) {
    message.textContent = `Could not revoke “${name}”: ${error instanceof Error ? error.message : String(error)}`;
    message.className = 'problem';
  }
  await renderDevices();
  await renderDevice();
}

function pairWith(code: string): void {
  const error = $('pair-error');
  error.hidden = true;
  $('status-text').textContent = 'pairing…';
  pair(engine.store, code, $<HTMLInputElement>('device-name').value || 'browser')
    .then(() => showNotes())
    .catch((failure: unknown) => {
      error.textContent = `Pairing failed: ${failure instanceof Error ? failure.message : String(failure)}`;
      error.hidden = false;
      $('status-text').textContent = 'not paired yet';
    });
}

function showPairing(): void {
  $('pairing').hidden = false;
  $('status').dataset.state = 'stopped';
  $('status-text').textContent = 'not paired yet';
  $('pair').addEventListener('click', () => pairWith($<HTMLTextAreaElement>('code').value));
  let scanning: AbortController | null = null;
  const video = $<HTMLVideoElement>('camera');
  const message = $('scan-message');
  const stopScanning = () => {
    scanning?.abort();
    scanning = null;
    video.hidden = true;
    $('scan-stop').hidden = true;
  };
  $('scan-stop').addEventListener('click', () => {
    stopScanning();
    message.hidden = true;
  });
  $('scan').addEventListener('click', () => {
    if (scanning) return;
    scanning = new AbortController();
    video.hidden = false;
    $('scan-stop').hidden = false;
    message.className = '';
    message.textContent = 'Point the camera at the QR code that `lockstep-cli pair show` draws.';
    message.hidden = false;
    scanPairingCode(video, scanning.signal, (notice) => (message.textContent = notice))
      .then((code) => {
        stopScanning();
        message.textContent = 'Pairing code scanned.';
        $<HTMLTextAreaElement>('code').value = code;
        pairWith(code);
      })
      .catch((failure: unknown) => {
        const aborted = scanning === null;
        stopScanning();
        if (aborted) return;
        message.className = 'problem';
        message.textContent = failure instanceof ScanError ? failure.message : `Scanning failed: ${String(failure)}; paste the code instead.`;
      });
  });
}

if (await engine.store.account()) await showNotes();
else showPairing();
