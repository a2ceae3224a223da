/**
 * JSON as the Rust client reads and writes it (serde_json): integers beyond 2^53 stay exact
 * (`bigint`), objects serialize with their keys in UTF-8 byte order (serde_json's `BTreeMap`),
 * compact. The canonical form decides ties in the merge, so it must match byte for byte.
 *
 * Known difference: serde_json keeps `2.0` a float and writes it back as `2.0`; JavaScript
 * reads it as the number 2 and writes `2`. Only a tie between two different values of one
 * stamp (which one device never produces) compares these texts.
 */
import { isInteger, isSafeNumber, parse } from 'lossless-json';

import { compareUtf8 } from './bytes.js';

export type JsonValue = null | boolean | number | bigint | string | JsonValue[] | { [key: string]: JsonValue };

function parseNumber(text: string): number | bigint {
  if (isInteger(text) && !isSafeNumber(text)) return BigInt(text);
  return Number(text);
}

/** Parses JSON text; integers beyond 2^53 become `bigint`. */
export function parseJson(text: string): JsonValue {
  return parse(text, null, parseNumber) as JsonValue;
}

/** serde_json's compact form, with object keys in UTF-8 byte order. */
export function canonicalJson(value: JsonValue): string {
  if (value === null) return 'null';
  switch (typeof value) {
    case 'boolean':
      return value ? 'true' : 'false';
    case 'bigint':
      return value.toString();
    case 'number':
      if (!Number.isFinite(value)) throw new TypeError('JSON has no NaN or infinity');
      return JSON.stringify(value);
    case 'string':
      return JSON.stringify(value);
    default:
      break;
  }
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(',')}]`;
  const keys = Object.keys(value).sort(compareUtf8);
  return `{${keys.map((key) => `${JSON.stringify(key)}:${canonicalJson(value[key]!)}`).join(',')}}`;
}

/** Deep equality of JSON values (numbers and bigints of one value are equal). */
export function jsonEquals(a: JsonValue, b: JsonValue): boolean {
  return canonicalJson(a) === canonicalJson(b);
}
