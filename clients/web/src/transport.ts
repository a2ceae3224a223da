/**
 * The gRPC-Web transport: the server's services called with `fetch`, the messages of `proto/`
 * (generated into `gen/` by `npm run gen`), unary calls and the server-streaming Subscribe.
 * A failed call is an `RpcError` whose message says in plain words what went wrong; its
 * `code` is the gRPC status code.
 */
import { create, fromBinary, toBinary, type DescMessage, type MessageInitShape, type MessageShape } from '@bufbuild/protobuf';
import { CONTENT_TYPE, FrameReader, GrpcStatus, callStatus, frame } from './grpc-web.js';
import {
  ListDevicesRequestSchema,
  ListDevicesResponseSchema,
  RedeemPairingTicketRequestSchema,
  RedeemPairingTicketResponseSchema,
  RevokeDeviceRequestSchema,
  RevokeDeviceResponseSchema,
} from './gen/lockstep/v1/accounts_pb.js';
import {
  GetEpochKeysRequestSchema,
  GetEpochKeysResponseSchema,
  ListDeviceKeysRequestSchema,
  ListDeviceKeysResponseSchema,
  RegisterDeviceKeyRequestSchema,
  RegisterDeviceKeyResponseSchema,
  type SealedEpochKeySchema,
  ShareEpochKeysRequestSchema,
  ShareEpochKeysResponseSchema,
  StartKeyEpochRequestSchema,
  StartKeyEpochResponseSchema,
} from './gen/lockstep/v1/keys_pb.js';
import { SetPushTargetRequestSchema, SetPushTargetResponseSchema } from './gen/lockstep/v1/push_targets_pb.js';
import {
  AckRequestSchema,
  AckResponseSchema,
  GetServerInfoRequestSchema,
  GetServerInfoResponseSchema,
  PushRequestSchema,
  PushResponseSchema,
  SubscribeRequestSchema,
  SubscribeResponseSchema,
  type SubscribeResponse,
} from './gen/lockstep/v1/sync_pb.js';

const CODE_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(GrpcStatus).map(([name, code]) => [code, name]),
);

/** What a status code means to a person using the app. */
function explain(code: number, call: string, server: string): string {
  switch (code) {
    case GrpcStatus.Unavailable:
      return `the server at ${server} cannot be reached right now`;
    case GrpcStatus.Unauthenticated:
      return 'the server no longer accepts this device: was it removed from the account?';
    case GrpcStatus.PermissionDenied:
      return 'the server refused this device';
    case GrpcStatus.ResourceExhausted:
      return 'the server is busy or this device sent too much: it will try again';
    case GrpcStatus.DeadlineExceeded:
      return 'the server took too long to answer';
    case GrpcStatus.NotFound:
      return `${call}: not found`;
    case GrpcStatus.Unimplemented:
      return `the server does not offer ${call} (an older server?)`;
    default:
      return `${call} failed`;
  }
}

export class RpcError extends Error {
  constructor(
    readonly call: string,
    readonly code: number,
    readonly detail: string,
    server: string,
    /** Whether `detail` is the server's `grpc-message` (else what the browser said). */
    fromServer = true,
  ) {
    super(`${explain(code, call, server)}${detail ? ` (${fromServer ? 'server says: ' : ''}${detail})` : ''}`);
    this.name = 'RpcError';
  }

  get codeName(): string {
    return CODE_NAMES[this.code] ?? `code ${this.code}`;
  }

  /** Whether trying again later may succeed. */
  get transient(): boolean {
    return ([
      GrpcStatus.Unavailable,
      GrpcStatus.DeadlineExceeded,
      GrpcStatus.ResourceExhausted,
      GrpcStatus.Aborted,
      GrpcStatus.Cancelled,
      GrpcStatus.Unknown,
      GrpcStatus.Internal,
    ] as number[]).includes(this.code);
  }
}

export interface CallOptions {
  /** Gives up after this long (default: the transport's). */
  timeoutMs?: number;
  signal?: AbortSignal;
}

type Fetch = typeof fetch;

/** One server, with or without a device token. */
export class Transport {
  readonly server: string;

  constructor(
    server: string,
    private token: string | null = null,
    private readonly options: { fetch?: Fetch; timeoutMs?: number } = {},
  ) {
    this.server = server.replace(/\/+$/, '');
  }

  withToken(token: string): Transport {
    return new Transport(this.server, token, this.options);
  }

  private headers(timeoutMs: number | null): Record<string, string> {
    const headers: Record<string, string> = { 'content-type': CONTENT_TYPE, 'x-grpc-web': '1' };
    if (this.token) headers.authorization = `Bearer ${this.token}`;
    if (timeoutMs !== null) headers['grpc-timeout'] = `${Math.max(1, Math.ceil(timeoutMs))}m`;
    return headers;
  }

  private async post(path: string, body: Uint8Array, timeoutMs: number | null, signal?: AbortSignal): Promise<Response> {
    const call = path.slice(path.lastIndexOf('/') + 1);
    const signals = [signal, timeoutMs === null ? undefined : AbortSignal.timeout(timeoutMs + 2_000)].filter(
      (item): item is AbortSignal => item !== undefined,
    );
    let response: Response;
    try {
      response = await (this.options.fetch ?? fetch)(`${this.server}/${path}`, {
        method: 'POST',
        headers: this.headers(timeoutMs),
        body: body as BodyInit,
        signal: signals.length ? AbortSignal.any(signals) : undefined,
        cache: 'no-store',
      });
    } catch (error) {
      if (signal?.aborted) throw new RpcError(call, GrpcStatus.Cancelled, 'stopped', this.server);
      const timedOut = error instanceof DOMException && error.name === 'TimeoutError';
      // fetch says no more (a refused connection and a refused CORS check look alike to a page).
      const said = error instanceof Error ? error.message : String(error);
      throw new RpcError(
        call,
        timedOut ? GrpcStatus.DeadlineExceeded : GrpcStatus.Unavailable,
        timedOut ? said : `${said}: is it running, and does its web.allowed_origins list this page's origin?`,
        this.server,
        false,
      );
    }
    if (!response.ok) {
      throw new RpcError(
        call,
        response.status === 401 ? GrpcStatus.Unauthenticated : GrpcStatus.Unavailable,
        `HTTP ${response.status}`,
        this.server,
        false,
      );
    }
    return response;
  }

  /** Reads a response's frames, as they come; throws the call's error status at the end. */
  private async *frames(call: string, response: Response, maxMessageBytes: number): AsyncGenerator<Uint8Array> {
    const reader = new FrameReader(maxMessageBytes);
    let trailers: Map<string, string> | undefined;
    const body = response.body;
    if (body) {
      const chunks = body.getReader();
      try {
        for (;;) {
          let next: ReadableStreamReadResult<Uint8Array>;
          try {
            next = await chunks.read();
          } catch (error) {
            throw new RpcError(call, GrpcStatus.Unavailable, `the answer was cut: ${String(error)}`, this.server, false);
          }
          if (next.done) break;
          for (const item of reader.push(next.value)) {
            if (item.kind === 'message') yield item.message;
            else trailers = item.trailers;
          }
        }
      } finally {
        chunks.releaseLock();
      }
    }
    const status = callStatus(trailers, response.headers);
    if (status === null) {
      throw new RpcError(call, GrpcStatus.Unavailable, 'the answer ended without a status', this.server, false);
    }
    if (status.code !== GrpcStatus.Ok) throw new RpcError(call, status.code, status.message, this.server);
    if (!reader.atFrameBoundary()) {
      throw new RpcError(call, GrpcStatus.Unavailable, 'the answer was cut inside a message', this.server, false);
    }
  }

  async unary<I extends DescMessage, O extends DescMessage>(
    path: string,
    input: I,
    request: MessageInitShape<I>,
    output: O,
    options: CallOptions = {},
  ): Promise<MessageShape<O>> {
    const call = path.slice(path.lastIndexOf('/') + 1);
    const body = frame(toBinary(input, create(input, request)));
    const timeoutMs = options.timeoutMs ?? this.options.timeoutMs ?? 20_000;
    const response = await this.post(path, body, timeoutMs, options.signal);
    let answer: MessageShape<O> | undefined;
    for await (const message of this.frames(call, response, 16 * 1024 * 1024)) {
      answer ??= fromBinary(output, message);
    }
    if (answer === undefined) throw new RpcError(call, GrpcStatus.Internal, 'no answer message', this.server);
    return answer;
  }

  async *serverStream<I extends DescMessage, O extends DescMessage>(
    path: string,
    input: I,
    request: MessageInitShape<I>,
    output: O,
    options: { signal?: AbortSignal; maxMessageBytes?: number } = {},
  ): AsyncGenerator<MessageShape<O>> {
    const call = path.slice(path.lastIndexOf('/') + 1);
    const body = frame(toBinary(input, create(input, request)));
    const response = await this.post(path, body, null, options.signal);
    try {
      for await (const message of this.frames(call, response, options.maxMessageBytes ?? 64 * 1024 * 1024)) {
        yield fromBinary(output, message);
      }
    } catch (error) {
      if (options.signal?.aborted) return;
      throw error;
    }
  }

  // The calls a device makes.

  serverInfo(options?: CallOptions) {
    return this.unary('lockstep.v1.Sync/GetServerInfo', GetServerInfoRequestSchema, {}, GetServerInfoResponseSchema, options);
  }

  redeem(ticket: string, deviceName: string, options?: CallOptions) {
    return this.unary(
      'lockstep.v1.Accounts/RedeemPairingTicket',
      RedeemPairingTicketRequestSchema,
      { ticket, deviceName },
      RedeemPairingTicketResponseSchema,
      options,
    );
  }

  registerDeviceKey(publicKey: Uint8Array, proof: Uint8Array, options?: CallOptions) {
    return this.unary(
      'lockstep.v1.Keys/RegisterDeviceKey',
      RegisterDeviceKeyRequestSchema,
      { publicKey, proof },
      RegisterDeviceKeyResponseSchema,
      options,
    );
  }

  epochKeys(sinceEpoch: number, unopenedEpochs: number[] = [], options?: CallOptions) {
    return this.unary(
      'lockstep.v1.Keys/GetEpochKeys',
      GetEpochKeysRequestSchema,
      { sinceEpoch, unopenedEpochs },
      GetEpochKeysResponseSchema,
      options,
    );
  }

  listDeviceKeys(options?: CallOptions) {
    return this.unary('lockstep.v1.Keys/ListDeviceKeys', ListDeviceKeysRequestSchema, {}, ListDeviceKeysResponseSchema, options);
  }

  startKeyEpoch(epoch: number, sealedKeys: MessageInitShape<typeof SealedEpochKeySchema>[], options?: CallOptions) {
    return this.unary(
      'lockstep.v1.Keys/StartKeyEpoch',
      StartKeyEpochRequestSchema,
      { epoch, sealedKeys },
      StartKeyEpochResponseSchema,
      options,
    );
  }

  shareEpochKeys(sealedKeys: MessageInitShape<typeof SealedEpochKeySchema>[], options?: CallOptions) {
    return this.unary(
      'lockstep.v1.Keys/ShareEpochKeys',
      ShareEpochKeysRequestSchema,
      { sealedKeys },
      ShareEpochKeysResponseSchema,
      options,
    );
  }

  listDevices(options?: CallOptions) {
    return this.unary('lockstep.v1.Accounts/ListDevices', ListDevicesRequestSchema, {}, ListDevicesResponseSchema, options);
  }

  revokeDevice(deviceId: string, options?: CallOptions) {
    return this.unary(
      'lockstep.v1.Accounts/RevokeDevice',
      RevokeDeviceRequestSchema,
      { deviceId },
      RevokeDeviceResponseSchema,
      options,
    );
  }

  push(changes: MessageInitShape<typeof PushRequestSchema>['changes'], options?: CallOptions) {
    return this.unary('lockstep.v1.Sync/Push', PushRequestSchema, { changes }, PushResponseSchema, options);
  }

  subscribe(
    fromOffset: bigint | undefined,
    repair: boolean,
    options?: { signal?: AbortSignal; maxMessageBytes?: number },
  ): AsyncGenerator<SubscribeResponse> {
    return this.serverStream(
      'lockstep.v1.Sync/Subscribe',
      SubscribeRequestSchema,
      { fromOffset, repair },
      SubscribeResponseSchema,
      options,
    );
  }

  ack(offset: bigint, options?: CallOptions) {
    return this.unary('lockstep.v1.Sync/Ack', AckRequestSchema, { offset }, AckResponseSchema, options);
  }

  setWebPushTarget(endpoint: string, p256dh: Uint8Array, auth: Uint8Array, options?: CallOptions) {
    return this.unary(
      'lockstep.v1.PushTargets/SetPushTarget',
      SetPushTargetRequestSchema,
      { target: { target: { case: 'webPush', value: { endpoint, p256dh, auth } } } },
      SetPushTargetResponseSchema,
      options,
    );
  }
}
