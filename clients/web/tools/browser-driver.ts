/**
 * Drives the PWA in a real headless Chromium (Debian's `chromium`, through `playwright-core`;
 * no browser is downloaded) for the end-to-end tests in `tests/tests/web_pwa.rs`: one JSON
 * command per line on stdin, one JSON answer per line on stdout (`{"ok":…}` or
 * `{"error":"…"}`). The test (Rust) holds the server and the CLI device and decides; this
 * program only acts in the browser and reports what the page shows.
 *
 * Commands: open {url, camera?} (camera: a .y4m or .mjpeg file Chromium's fake camera plays),
 * pair {code}, scanPair {name} (pairs from the QR code the camera shows), scanProblem (what
 * the page says when scanning cannot start), revoke {deviceId, accept} (the device list's
 * button and its confirmation, accepted or dismissed), addNote {title, body}, put {id, fields}, notes, status,
 * reload, close, wake {payload | data} (a Web Push delivered to the service worker with the DevTools
 * protocol's ServiceWorker.deliverPushMessage, no page of the app open), stored {id} (a
 * record as IndexedDB holds it, read from a page of the origin that does not run the app),
 * screenshot {path}, quit.
 */
import { createInterface } from 'node:readline';

import { type Browser, type BrowserContext, type Page, chromium } from 'playwright-core';

type Command = { cmd: string; [key: string]: unknown };

const executablePath = process.env.LOCKSTEP_CHROMIUM ?? '/usr/bin/chromium';
let browser: Browser | null = null;
let context: BrowserContext | null = null;
let page: Page | null = null;
let appUrl = '';
const registrations = new Map<string, string>();

function requirePage(): Page {
  if (!page) throw new Error('no page of the app is open');
  return page;
}

async function appReady(target: Page): Promise<void> {
  await target.waitForFunction(() => 'lockstep' in window && document.getElementById('status-text')?.textContent !== 'starting…');
}

async function openApp(): Promise<Page> {
  const opened = await context!.newPage();
  opened.on('console', (message) => process.stderr.write(`[page ${message.type()}] ${message.text()}\n`));
  opened.on('pageerror', (error) => process.stderr.write(`[page error] ${error.message}\n`));
  await opened.goto(appUrl);
  await appReady(opened);
  return opened;
}

/** A page of the app's origin that runs none of its code (the service worker still controls the origin). */
async function probePage(): Promise<Page> {
  const probe = await context!.newPage();
  await probe.goto(new URL('icon.svg', appUrl).toString());
  return probe;
}

async function handle(command: Command): Promise<unknown> {
  switch (command.cmd) {
    case 'open': {
      appUrl = String(command.url);
      const camera = typeof command.camera === 'string' ? command.camera : null;
      const args = ['--no-sandbox'];
      // A fake camera that plays the given file, with getUserMedia's permission granted.
      if (camera) args.push('--use-fake-ui-for-media-stream', '--use-fake-device-for-media-stream', `--use-file-for-fake-video-capture=${camera}`);
      browser ??= await chromium.launch({ executablePath, headless: true, args });
      context ??= await browser.newContext({ viewport: { width: 820, height: 900 } });
      if (camera) await context.grantPermissions(['camera'], { origin: new URL(appUrl).origin });
      page = await openApp();
      return page.locator('#status-text').textContent();
    }
    case 'pair': {
      const current = requirePage();
      await current.fill('#code', String(command.code));
      await current.fill('#device-name', String(command.name ?? 'browser'));
      await current.click('#pair');
      await current.waitForFunction(
        () => !document.getElementById('notes')!.hidden || !document.getElementById('pair-error')!.hidden,
      );
      const error = await current.locator('#pair-error').isVisible();
      if (error) throw new Error(String(await current.locator('#pair-error').textContent()));
      // The service worker takes the page over once installed (it caches the app for offline use).
      await current.waitForFunction(async () => Boolean((await navigator.serviceWorker.ready).active));
      return true;
    }
    case 'scanPair': {
      const current = requirePage();
      await current.fill('#device-name', String(command.name ?? 'browser'));
      await current.click('#scan');
      await current.waitForFunction(
        () =>
          !document.getElementById('notes')!.hidden ||
          !document.getElementById('pair-error')!.hidden ||
          document.getElementById('scan-message')!.className === 'problem',
        undefined,
        { timeout: 60_000 },
      );
      for (const failure of ['#pair-error', '#scan-message.problem']) {
        if (await current.locator(failure).isVisible()) throw new Error(String(await current.locator(failure).textContent()));
      }
      await current.waitForFunction(async () => Boolean((await navigator.serviceWorker.ready).active));
      return current.locator('#scan-message').textContent();
    }
    case 'scanProblem': {
      const current = requirePage();
      await current.click('#scan');
      await current.waitForFunction(() => document.getElementById('scan-message')!.className === 'problem');
      return current.locator('#scan-message').textContent();
    }
    case 'revoke': {
      const current = requirePage();
      await current.evaluate(() => ((document.getElementById('details') as HTMLDetailsElement).open = true));
      await current.click('#load-devices');
      const button = current.locator(`#devices li[data-device-id="${String(command.deviceId)}"] button.revoke`);
      await button.waitFor();
      let asked = '';
      current.once('dialog', (dialog) => {
        asked = dialog.message();
        void (command.accept === false ? dialog.dismiss() : dialog.accept());
      });
      await current.evaluate(() => (document.getElementById('devices-message')!.textContent = ''));
      await button.click();
      await current.waitForFunction(() => {
        const said = document.getElementById('devices-message')!.textContent ?? '';
        return said !== '' && !said.endsWith('…');
      });
      return { asked, said: await current.locator('#devices-message').textContent() };
    }
    case 'addNote': {
      const current = requirePage();
      const before = await current.locator('#list li').count();
      await current.fill('#new-title', String(command.title));
      await current.fill('#new-body', String(command.body ?? ''));
      await current.click('#new-note button');
      await current.waitForFunction((count) => document.querySelectorAll('#list li').length > count, before);
      return current.evaluate(
        (title) => [...document.querySelectorAll<HTMLLIElement>('#list li')].find(
          (li) => li.querySelector<HTMLInputElement>('.title')!.value === title,
        )?.dataset.id,
        String(command.title),
      );
    }
    case 'put':
      return requirePage().evaluate(
        async ([id, fields]) => {
          const { engine } = (window as unknown as { lockstep: { engine: { put(c: string, id: string, f: unknown): Promise<{ recordId: string }> } } }).lockstep;
          return (await engine.put('notes', id as string, fields)).recordId;
        },
        [command.id, command.fields],
      );
    case 'notes':
      // What the page shows, from its list (the app's own table).
      return requirePage().evaluate(() =>
        Object.fromEntries(
          [...document.querySelectorAll<HTMLLIElement>('#list li')].map((li) => [
            li.dataset.id,
            { title: li.querySelector<HTMLInputElement>('.title')!.value, body: li.querySelector<HTMLTextAreaElement>('.body')!.value },
          ]),
        ),
      );
    case 'records':
      // Every live record's visible fields, from the store.
      return requirePage().evaluate(async () => {
        const { store } = (window as unknown as { lockstep: { store: { list(c: string): Promise<{ recordId: string; state: { visible(): unknown } }[]> } } }).lockstep;
        const records = await store.list('notes');
        return Object.fromEntries(records.map((record) => [record.recordId, record.state.visible()]));
      }).then((value) => JSON.parse(JSON.stringify(value, (_, item) => (typeof item === 'bigint' ? Number(item) : item))));
    case 'status': {
      const current = requirePage();
      const status = await current.evaluate(() => (window as unknown as { lockstep: { engine: { status: unknown } } }).lockstep.engine.status);
      return { ...(status as object), shown: await current.locator('#status-text').textContent() };
    }
    case 'reload': {
      // No waiting for anything to settle: a reload may land in the middle of a sync.
      const current = requirePage();
      await current.reload({ waitUntil: 'commit' });
      await appReady(current);
      return true;
    }
    case 'close':
      await page?.close();
      page = null;
      return true;
    case 'wake': {
      const probe = await probePage();
      try {
        const cdp = await context!.newCDPSession(probe);
        const origin = new URL(appUrl).origin;
        const found = new Promise<string>((resolve) => {
          cdp.on('ServiceWorker.workerRegistrationUpdated', (event: { registrations: { registrationId: string; scopeURL: string; isDeleted: boolean }[] }) => {
            for (const registration of event.registrations) {
              if (!registration.isDeleted && registration.scopeURL.startsWith(origin)) {
                registrations.set(origin, registration.registrationId);
                resolve(registration.registrationId);
              }
            }
          });
        });
        await cdp.send('ServiceWorker.enable');
        const registrationId = registrations.get(origin) ?? (await found);
        await cdp.send('ServiceWorker.deliverPushMessage', {
          origin,
          registrationId,
          // `data`: a payload exactly as a push service delivered it; else `payload` as JSON.
          data: typeof command.data === 'string' ? command.data : JSON.stringify(command.payload ?? {}),
        });
        return registrationId;
      } finally {
        await probe.close();
      }
    }
    case 'stored': {
      // Read from IndexedDB directly, in a page that runs none of the app: only the service worker can have synced.
      const probe = await probePage();
      try {
        return await probe.evaluate(
          ([database, id]) =>
            new Promise((resolve, reject) => {
              const open = indexedDB.open(database!);
              open.onerror = () => reject(open.error);
              open.onsuccess = () => {
                const db = open.result;
                const get = db.transaction(['records', 'meta']).objectStore('records').get(id!);
                get.onsuccess = () => {
                  const wake = db.transaction('meta').objectStore('meta').get('lastWake');
                  wake.onsuccess = () => {
                    resolve({ record: get.result ?? null, lastWake: wake.result ?? null });
                    db.close();
                  };
                };
                get.onerror = () => reject(get.error);
              };
            }),
          ['lockstep-notes', String(command.id)],
        );
      } finally {
        await probe.close();
      }
    }
    case 'screenshot':
      await requirePage().screenshot({ path: String(command.path) });
      return true;
    case 'eval':
      return requirePage().evaluate(String(command.expression));
    case 'quit':
      await browser?.close();
      browser = null;
      return true;
    default:
      throw new Error(`unknown command ${command.cmd}`);
  }
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  let answer: object;
  try {
    answer = { ok: (await handle(JSON.parse(line) as Command)) ?? null };
  } catch (error) {
    answer = { error: error instanceof Error ? error.message : String(error) };
  }
  process.stdout.write(`${JSON.stringify(answer)}\n`);
}
await (browser as Browser | null)?.close();
