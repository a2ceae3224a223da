/** What the page and the service worker share. */
import { Store, SyncEngine } from '../src/index.js';

export const DATABASE = 'lockstep-notes';
export const CHANNEL = 'lockstep-notes';
export const COLLECTION = 'notes';

export async function openEngine(): Promise<SyncEngine> {
  return new SyncEngine(await Store.open(DATABASE), { channelName: CHANNEL });
}
