/**
 * Ids made offline, as the Rust client's `ids` module: UUIDv7 (48-bit Unix milliseconds, then
 * random bits), unique without coordination and sortable by creation time. Ids from one
 * generator strictly increase, also within a millisecond or when the wall clock steps back:
 * the 74 bits after the timestamp count up from a random start.
 */
import { randomBytes } from '@noble/hashes/utils.js';

const RANDOM_BITS = 74n;
const RANDOM_MAX = (1n << RANDOM_BITS) - 1n;

export class IdGenerator {
  #lastMs = -1n;
  #counter = 0n;

  constructor(private readonly now: () => number = Date.now) {}

  next(): string {
    let ms = BigInt(Math.floor(this.now()));
    if (ms > this.#lastMs) {
      // A fresh random start, its top bit clear so that the counter has room.
      const random = randomBytes(10).reduce((acc, byte) => (acc << 8n) | BigInt(byte), 0n);
      this.#counter = random & (RANDOM_MAX >> 1n);
    } else {
      ms = this.#lastMs;
      this.#counter += 1n;
      if (this.#counter > RANDOM_MAX) {
        ms += 1n;
        this.#counter = 0n;
      }
    }
    this.#lastMs = ms;
    const randA = this.#counter >> 62n; // 12 bits
    const randB = this.#counter & ((1n << 62n) - 1n); // 62 bits
    const value = (ms << 80n) | (7n << 76n) | (randA << 64n) | (2n << 62n) | randB;
    const hex = value.toString(16).padStart(32, '0');
    return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
  }
}

const shared = new IdGenerator();

/** A new id (hyphenated lowercase UUIDv7), strictly greater than the previous one of this page. */
export function newId(): string {
  return shared.next();
}

/** The maximum length and alphabet the server accepts for record ids; throws with the reason. */
export function validateRecordId(id: string): void {
  if (id.length === 0 || id.length > 128) throw new Error(`record id ${JSON.stringify(id)} must have 1 to 128 characters`);
  if (!/^[A-Za-z0-9._:-]+$/.test(id)) {
    throw new Error(`record id ${JSON.stringify(id)} may only contain A-Z a-z 0-9 . _ : -`);
  }
}

export function validateCollection(collection: string): void {
  if (collection.length === 0 || collection.length > 64) {
    throw new Error(`collection ${JSON.stringify(collection)} must have 1 to 64 characters`);
  }
  if (!/^[a-z0-9._-]+$/.test(collection)) {
    throw new Error(`collection ${JSON.stringify(collection)} may only contain a-z 0-9 . _ -`);
  }
}
