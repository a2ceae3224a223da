/**
 * The PWA's service worker: keeps the app's files for offline use, and on a Web Push wake-up
 * syncs (the push carries metadata only: the changes themselves come over Subscribe, sealed).
 */
import { openEngine } from './common.js';

interface ExtendableEvent extends Event {
  waitUntil(promise: Promise<unknown>): void;
}
interface FetchEvent extends ExtendableEvent {
  request: Request;
  respondWith(response: Promise<Response>): void;
}
interface PushEvent extends ExtendableEvent {
  data: { text(): string } | null;
}
interface WorkerScope {
  addEventListener(type: string, listener: (event: never) => void): void;
  skipWaiting(): Promise<void>;
  clients: { claim(): Promise<void>; matchAll(options: { type: string }): Promise<{ visibilityState?: string }[]> };
  registration: { showNotification(title: string, options: { body: string; tag: string }): Promise<void> };
  location: Location;
}
const worker = self as unknown as WorkerScope;

const CACHE = 'lockstep-notes-v1';
const FILES = ['./', 'index.html', 'app.js', 'sw.js', 'style.css', 'manifest.webmanifest', 'icon.svg'];

worker.addEventListener('install', (event: ExtendableEvent) => {
  event.waitUntil(
    caches
      .open(CACHE)
      .then((cache) => cache.addAll(FILES))
      .then(() => worker.skipWaiting()),
  );
});

worker.addEventListener('activate', (event: ExtendableEvent) => {
  event.waitUntil(worker.clients.claim());
});

// The app's own files: the network when it answers (updates land), else the cache (offline).
worker.addEventListener('fetch', (event: FetchEvent) => {
  const url = new URL(event.request.url);
  if (event.request.method !== 'GET' || url.origin !== worker.location.origin) return;
  event.respondWith(
    fetch(event.request)
      .then((response) => {
        if (response.ok) {
          const copy = response.clone();
          void caches.open(CACHE).then((cache) => cache.put(event.request, copy));
        }
        return response;
      })
      .catch(async () => (await caches.match(event.request, { ignoreSearch: true })) ?? Response.error()),
  );
});

worker.addEventListener('push', (event: PushEvent) => {
  let payload: unknown = null;
  try {
    payload = event.data ? JSON.parse(event.data.text()) : null;
  } catch {
    payload = event.data?.text() ?? null;
  }
  event.waitUntil(
    (async () => {
      const engine = await openEngine();
      try {
        await engine.store.setMeta('lastWake', { atMs: Date.now(), payload });
        if (!(await engine.store.account())) return;
        const report = await engine.syncOnce();
        await engine.store.setMeta('lastWake', { atMs: Date.now(), payload, report });
        // A push subscribed with userVisibleOnly shows something when no page of the app is in view.
        const windows = await worker.clients.matchAll({ type: 'window' });
        if (report.changedRecords && !windows.some((client) => client.visibilityState === 'visible')) {
          const body = `${report.changedRecords} note${report.changedRecords === 1 ? '' : 's'} changed on your other devices`;
          await worker.registration.showNotification('Lockstep Notes', { body, tag: 'lockstep-sync' }).catch(() => undefined);
        }
      } finally {
        engine.store.close();
      }
    })(),
  );
});
