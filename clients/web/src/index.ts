/**
 * Lockstep's browser client, first slice: the parts that must agree with the Rust client bit
 * for bit (envelope encryption, key epochs, HLC, ids, per-field merge, pairing codes). The
 * store (IndexedDB), the outbox and the gRPC-Web transport build on these.
 */
export * from './bytes.js';
export * from './crypto.js';
export * from './epochs.js';
export * from './grpc-web.js';
export * from './hlc.js';
export * from './ids.js';
export * from './json.js';
export * from './pairing.js';
export * from './record.js';
export * from './revocations.js';
export * from './store.js';
export * from './sync.js';
export * from './transport.js';
export * from './adapters.js';
