/**
 * Adapters that keep an app's own tables in step with the engine's records: a Dexie table (or
 * any table with Dexie's `put`/`delete`, such as an `idb` object store wrapper) gets a row per
 * live record of one collection, and loses it when the record is deleted. The app reads its
 * table as it always did, and writes through `SyncEngine.put`/`delete` (sealed, queued, merged).
 */
import type { JsonValue } from './json.js';
import type { TableAdapter } from './sync.js';

/** What an adapter needs of a table: Dexie's `Table.put` and `Table.delete`. */
export interface WritableTable<Row> {
  put(row: Row): Promise<unknown>;
  delete(key: string): Promise<unknown>;
}

/**
 * Keeps `table` equal to the live records of `collection`: each becomes `toRow(id, fields)`
 * (by default the fields with the record id as `id`, the table's primary key).
 */
export function dexieTable<Row = { id: string } & { [name: string]: JsonValue }>(
  collection: string,
  table: WritableTable<Row>,
  toRow: (id: string, fields: { [name: string]: JsonValue }) => Row = (id, fields) => ({ ...fields, id }) as Row,
): TableAdapter {
  return {
    collection,
    async apply(recordId, fields) {
      if (fields === null) await table.delete(recordId);
      else await table.put(toRow(recordId, fields));
    },
  };
}
