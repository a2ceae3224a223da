/**
 * Hybrid logical clock, as the Rust client's `hlc` module: `(physical milliseconds << 16) |
 * counter`, the encoding of a change's `hlc` field. Stamps are `bigint`: they pass 2^53.
 */

export const LOGICAL_BITS = 16n;

export class ClockError extends Error {
  constructor(
    readonly aheadMs: bigint,
    readonly boundMs: bigint,
  ) {
    super(
      `a remote timestamp is ${aheadMs} ms ahead of this device's clock (the bound is ${boundMs} ms): ` +
        'refused; check the clocks of both devices',
    );
    this.name = 'ClockError';
  }
}

/** The wall-clock part of a stamp, in Unix milliseconds. */
export function physicalMs(stamp: bigint): bigint {
  return stamp >> LOGICAL_BITS;
}

export function fromPhysicalMs(ms: bigint | number): bigint {
  return BigInt(ms) << LOGICAL_BITS;
}

export interface ClockOptions {
  /** How far past this device's wall time a remote stamp may be. Default 7 days (the Rust CLI's `--max-clock-skew`). */
  maxAheadMs?: number;
  /** The wall clock in Unix milliseconds. Default `Date.now`. */
  now?: () => number;
  /** Added to the wall clock (may be negative). Default 0. */
  offsetMs?: number;
}

export class Clock {
  #last: bigint;
  readonly #maxAheadMs: bigint;
  readonly #now: () => number;
  readonly #offsetMs: number;

  /** A clock that has already issued or seen `last`. */
  constructor(last: bigint = 0n, options: ClockOptions = {}) {
    this.#last = last;
    this.#maxAheadMs = BigInt(options.maxAheadMs ?? 7 * 24 * 3600 * 1000);
    this.#now = options.now ?? Date.now;
    this.#offsetMs = options.offsetMs ?? 0;
  }

  /** Wall time as this clock reads it, in Unix milliseconds. */
  nowMs(): bigint {
    return BigInt(Math.max(0, Math.floor(this.#now()) + this.#offsetMs));
  }

  last(): bigint {
    return this.#last;
  }

  /** A new stamp, greater than every stamp issued or observed before. */
  tick(): bigint {
    const physical = fromPhysicalMs(this.nowMs());
    this.#last = physical > this.#last + 1n ? physical : this.#last + 1n;
    return this.#last;
  }

  /** Checks a remote stamp against the bound without moving the clock. */
  check(remote: bigint): void {
    const now = this.nowMs();
    const remoteMs = physicalMs(remote);
    if (remoteMs > now + this.#maxAheadMs) throw new ClockError(remoteMs - now, this.#maxAheadMs);
  }

  /** Moves the clock past a remote stamp, unless the stamp is too far ahead. */
  observe(remote: bigint): void {
    this.check(remote);
    if (remote > this.#last) this.#last = remote;
  }

  /** Moves the clock past a stamp this device already holds, however far ahead. */
  observeHeld(held: bigint): void {
    if (held > this.#last) this.#last = held;
  }
}
