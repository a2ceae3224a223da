/**
 * A record and its deterministic merge, as the Rust client's `record` module.
 *
 * A record is a map of fields; every field carries the stamp of its last write (HLC, device
 * id). A delete is a tombstone with its own stamp. Merging keeps, per field, the write with
 * the greater stamp (equal stamps: the greater value's canonical JSON), and the greater
 * tombstone: a join (commutative, associative, idempotent). A record is deleted while its
 * tombstone is later than every field write; a later edit brings it back with all its fields.
 */
import { compareUtf8 } from './bytes.js';
import { type JsonValue, canonicalJson, parseJson } from './json.js';

/** The field that names a record's parent record (folders, lists, …). */
export const PARENT_FIELD = 'parent';

export interface Stamp {
  hlc: bigint;
  device: string;
}

export interface Field {
  value: JsonValue;
  stamp: Stamp;
}

/** Orders stamps as Rust's derived `Ord`: by HLC, then device id (UTF-8 bytes). */
export function compareStamps(a: Stamp, b: Stamp): number {
  if (a.hlc !== b.hlc) return a.hlc < b.hlc ? -1 : 1;
  return compareUtf8(a.device, b.device);
}

/** `Option<Stamp>` order: none before any stamp. */
function compareOptional(a: Stamp | null, b: Stamp | null): number {
  if (a === null || b === null) return a === b ? 0 : a === null ? -1 : 1;
  return compareStamps(a, b);
}

function wins(incoming: Field, current: Field): boolean {
  const order = compareStamps(incoming.stamp, current.stamp);
  if (order !== 0) return order > 0;
  return compareUtf8(canonicalJson(incoming.value), canonicalJson(current.value)) > 0;
}

function stampJson(stamp: Stamp): string {
  return `{"hlc":${stamp.hlc},"device":${JSON.stringify(stamp.device)}}`;
}

export class PayloadError extends Error {
  constructor(
    readonly kind: 'malformed' | 'unknown-version',
    message: string,
    readonly found?: number,
  ) {
    super(message);
    this.name = 'PayloadError';
  }
}

function malformed(what: string): PayloadError {
  return new PayloadError('malformed', `malformed payload: ${what}`);
}

function isObject(value: unknown): value is { [key: string]: JsonValue } {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function readStamp(value: unknown, where: string): Stamp {
  if (!isObject(value)) throw malformed(`${where} is not a stamp`);
  const { hlc, device } = value;
  const valid = (typeof hlc === 'bigint' || (typeof hlc === 'number' && Number.isInteger(hlc))) && hlc >= 0;
  if (!valid || BigInt(hlc as number | bigint) >= 1n << 64n) throw malformed(`${where}.hlc is not a u64`);
  if (typeof device !== 'string') throw malformed(`${where}.device is not a string`);
  return { hlc: BigInt(hlc as number | bigint), device };
}

export class RecordState {
  readonly fields = new Map<string, Field>();
  deleted: Stamp | null = null;

  clone(): RecordState {
    const copy = new RecordState();
    for (const [name, field] of this.fields) copy.fields.set(name, { value: field.value, stamp: { ...field.stamp } });
    copy.deleted = this.deleted && { ...this.deleted };
    return copy;
  }

  /** Joins `other` into this state. Returns whether this state changed. */
  merge(other: RecordState): boolean {
    let changed = false;
    for (const [name, incoming] of other.fields) {
      const current = this.fields.get(name);
      if (current === undefined || wins(incoming, current)) {
        this.fields.set(name, { value: incoming.value, stamp: { ...incoming.stamp } });
        changed = true;
      }
    }
    if (compareOptional(other.deleted, this.deleted) > 0) {
      this.deleted = other.deleted && { ...other.deleted };
      changed = true;
    }
    return changed;
  }

  /** Writes `fields` with `stamp` (a local edit). A `null` value removes the field from view. */
  set(fields: { [name: string]: JsonValue }, stamp: Stamp): void {
    for (const [name, value] of Object.entries(fields)) this.fields.set(name, { value, stamp: { ...stamp } });
  }

  /** Deletes the record with `stamp` (a local delete). */
  delete(stamp: Stamp): void {
    if (compareOptional(stamp, this.deleted) > 0) this.deleted = { ...stamp };
  }

  /** The stamp of the latest field write. */
  latestWrite(): Stamp | null {
    let latest: Stamp | null = null;
    for (const { stamp } of this.fields.values()) if (compareOptional(stamp, latest) > 0) latest = stamp;
    return latest;
  }

  /** The greatest clock value anywhere in the state. */
  maxHlc(): bigint {
    const fields = this.latestWrite()?.hlc ?? 0n;
    const deleted = this.deleted?.hlc ?? 0n;
    return fields > deleted ? fields : deleted;
  }

  /** Deleted: a tombstone later than every field write. */
  isDeleted(): boolean {
    return this.deleted !== null && compareOptional(this.deleted, this.latestWrite()) > 0;
  }

  isLive(): boolean {
    return !this.isDeleted() && [...this.fields.values()].some((field) => field.value !== null);
  }

  /** What the user sees: the non-null fields, or `null` for a deleted record. */
  visible(): { [name: string]: JsonValue } | null {
    if (this.isDeleted()) return null;
    const out: { [name: string]: JsonValue } = {};
    for (const name of [...this.fields.keys()].sort(compareUtf8)) {
      const field = this.fields.get(name)!;
      if (field.value !== null) out[name] = field.value;
    }
    return out;
  }

  /** The parent record id, if the record names one. */
  parent(): string | null {
    const value = this.fields.get(PARENT_FIELD)?.value;
    return typeof value === 'string' ? value : null;
  }

  /** The state as the Rust client serializes it (serde_json), byte for byte. */
  toJsonText(): string {
    const names = [...this.fields.keys()].sort(compareUtf8);
    const fields = names.map((name) => {
      const field = this.fields.get(name)!;
      return `${JSON.stringify(name)}:{"value":${canonicalJson(field.value)},"stamp":${stampJson(field.stamp)}}`;
    });
    const deleted = this.deleted ? `,"deleted":${stampJson(this.deleted)}` : '';
    return `{"fields":{${fields.join(',')}}${deleted}}`;
  }

  /** Reads a parsed state (`{"fields": {...}, "deleted": {...}}`, both optional). */
  static fromJson(value: unknown): RecordState {
    if (!isObject(value)) throw malformed('the state is not an object');
    const state = new RecordState();
    const fields = value.fields ?? {};
    if (!isObject(fields)) throw malformed('fields is not an object');
    for (const [name, field] of Object.entries(fields)) {
      if (!isObject(field) || !('value' in field)) throw malformed(`field ${JSON.stringify(name)} has no value`);
      state.fields.set(name, { value: field.value!, stamp: readStamp(field.stamp, `fields.${name}.stamp`) });
    }
    if (value.deleted !== undefined && value.deleted !== null) state.deleted = readStamp(value.deleted, 'deleted');
    return state;
  }

  static fromJsonText(text: string): RecordState {
    return RecordState.fromJson(parseJson(text));
  }
}

/**
 * What one change carries inside its ciphertext: the pushing device's whole state of the
 * record, so that applying any subset of changes in any order is a join of states.
 */
export class ChangePayload {
  static readonly VERSION = 1;

  constructor(
    readonly state: RecordState,
    readonly v: number = ChangePayload.VERSION,
  ) {}

  /** UTF-8 JSON, byte for byte what the Rust client writes for the same state. */
  encode(): Uint8Array {
    return new TextEncoder().encode(`{"v":${this.v},"state":${this.state.toJsonText()}}`);
  }

  static decode(bytes: Uint8Array): ChangePayload {
    let parsed: JsonValue;
    try {
      parsed = parseJson(new TextDecoder('utf-8', { fatal: true }).decode(bytes));
    } catch (error) {
      throw malformed(error instanceof Error ? error.message : String(error));
    }
    // The version first: a newer payload may not parse as this version's state.
    if (!isObject(parsed)) throw malformed('not an object');
    const v = parsed.v;
    if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > 0xffffffff) throw malformed('no version');
    if (v !== ChangePayload.VERSION) {
      throw new PayloadError(
        'unknown-version',
        `payload version ${v} is not supported (this client reads ${ChangePayload.VERSION})`,
        v,
      );
    }
    return new ChangePayload(RecordState.fromJson(parsed.state));
  }
}
