//! The gRPC handlers: authenticate, check the request's shape, call the
//! library, map errors (through `ApiError`, the only place codes are chosen).

use lockstep_proto::v1::{
    AckRequest, AckResponse, CreateAccountRequest, CreateAccountResponse, CreatePairingTicketRequest,
    CreatePairingTicketResponse, DeleteAccountRequest, DeleteAccountResponse, Device, GetPushTargetRequest,
    GetPushTargetResponse, GetServerInfoRequest, GetServerInfoResponse, ListDevicesRequest, ListDevicesResponse,
    PushRequest, PushResponse, RateLimit, RedeemPairingTicketRequest, RedeemPairingTicketResponse,
    RegistrationMode as ProtoRegistrationMode, RemovePushTargetRequest, RemovePushTargetResponse, RevokeDeviceRequest,
    RevokeDeviceResponse, SetPushTargetRequest, SetPushTargetResponse, SubscribeRequest, WebPushTarget, WebhookTarget,
    accounts_server, push_target, push_targets_server, sync_server,
};
use lockstep_schemas::{PushTarget, TargetRemovedReason};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{
    App,
    rate_limit::{self, Source},
};
use crate::{
    accounts::{AuthedDevice, InviteClaim, InviteError},
    delivery::SubscribeStream,
    error::ApiError,
    gateway::validate::{MAX_CHANGE_ID_CHARS, MAX_RECORD_ID_CHARS},
    kafka::{Retry, bounded, user_topic},
    push_targets::{StoredTarget, TargetError},
    settings::RegistrationMode,
};

const MAX_DEVICE_NAME_CHARS: usize = 64;
const MAX_SECRET_CHARS: usize = 128;

pub(super) fn authenticate<T>(app: &App, request: &Request<T>) -> Result<AuthedDevice, ApiError> {
    // One parser for the token layer and the handlers (see `guard::bearer_token`).
    let token = super::guard::bearer_token(request.metadata().as_ref())?;
    app.accounts.authenticate(token).ok_or_else(|| ApiError::Unauthenticated("unknown or revoked device token".into()))
}

fn check_device_name(name: &str) -> Result<String, ApiError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(ApiError::InvalidArgument("device_name is missing".into()));
    }
    if name.chars().count() > MAX_DEVICE_NAME_CHARS {
        return Err(ApiError::InvalidArgument(format!(
            "device_name is longer than {MAX_DEVICE_NAME_CHARS} characters"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(ApiError::InvalidArgument("device_name contains control characters".into()));
    }
    Ok(name.to_string())
}

fn millis(duration: std::time::Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

/// Constant-time comparison, so the registration secret cannot be guessed byte by byte.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len() && given.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

pub struct AccountsApi {
    app: App,
}

impl AccountsApi {
    pub fn new(app: App) -> Self {
        Self { app }
    }

    /// Whether this CreateAccount may go on (see `AccountsSettings::registration_mode`); with
    /// an invite code, the invite it holds until the account exists.
    async fn admit(&self, request: &Request<CreateAccountRequest>) -> Result<Option<InviteClaim>, ApiError> {
        let settings = &self.app.settings.accounts;
        let mode = settings.registration_mode(self.app.settings.listen_addr);
        if mode == RegistrationMode::Closed {
            return Err(ApiError::PermissionDenied("this server does not accept new accounts".into()));
        }
        let code = request.get_ref().invite_code.trim();
        if !code.is_empty() {
            if code.len() > MAX_SECRET_CHARS {
                return Err(ApiError::InvalidArgument(format!(
                    "invite_code is longer than {MAX_SECRET_CHARS} characters"
                )));
            }
            return match self.app.accounts.invites().claim(code).await {
                Ok(claim) => Ok(Some(claim)),
                Err(InviteError::Db(error)) => Err(ApiError::Db(error)),
                Err(error) => Err(ApiError::PermissionDenied(error.to_string())),
            };
        }
        match mode {
            RegistrationMode::Open => Ok(None),
            RegistrationMode::Secret => {
                let given = request.metadata().get("x-lockstep-registration-secret").map(|value| value.as_bytes());
                let expected = settings.registration_secret.as_deref().unwrap_or_default().as_bytes();
                if given.is_some_and(|given| same_secret(given, expected)) {
                    Ok(None)
                } else {
                    Err(ApiError::PermissionDenied(
                        "creating an account needs an invite code or the server's registration secret \
                         (x-lockstep-registration-secret)"
                            .into(),
                    ))
                }
            }
            RegistrationMode::Invite | RegistrationMode::Closed => Err(ApiError::PermissionDenied(
                "this server takes new accounts by invite only: creating one needs an invite code from its operator"
                    .into(),
            )),
        }
    }
}

/// The proto form of the registration mode GetServerInfo advertises.
fn registration_mode_proto(mode: RegistrationMode) -> ProtoRegistrationMode {
    match mode {
        RegistrationMode::Open => ProtoRegistrationMode::Open,
        RegistrationMode::Secret => ProtoRegistrationMode::Secret,
        RegistrationMode::Invite => ProtoRegistrationMode::Invite,
        RegistrationMode::Closed => ProtoRegistrationMode::Closed,
    }
}

#[tonic::async_trait]
impl accounts_server::Accounts for AccountsApi {
    async fn create_account(
        &self,
        request: Request<CreateAccountRequest>,
    ) -> Result<Response<CreateAccountResponse>, Status> {
        let name = check_device_name(&request.get_ref().device_name)?;
        let rates = &self.app.rates;
        let source = Source::of(request.remote_addr().map(|addr| addr.ip()));
        if let Err(wait) = rates.failed_registration_per_address.peek(&source) {
            return Err(rate_limit::exhausted("refused invite codes or registration secrets", wait));
        }
        let invite = match self.admit(&request).await {
            Ok(invite) => invite,
            Err(refused @ ApiError::PermissionDenied(_)) => {
                // A guess: it takes from its source's own bucket, never from the budget
                // that admitted calls share.
                let _ = rates.failed_registration_per_address.check(&source);
                return Err(refused.into());
            }
            Err(error) => return Err(error.into()),
        };
        if let Err(wait) = rates.create_account_total.check(&()) {
            tracing::debug!(?wait, "rate limited: rate_limits.create_account_total");
            return Err(rate_limit::exhausted("new accounts", wait));
        }
        let user_id = uuid::Uuid::now_v7().to_string();
        let topic = user_topic(&self.app.settings.kafka, &user_id);
        // A failure from here on drops `invite`, which frees it for another try.
        self.app.topics.create_user_topic(&topic).await.map_err(ApiError::from)?;
        let accounts = &self.app.accounts;
        let created = match invite {
            None => accounts.create_account(user_id, name).await.map_err(ApiError::from),
            Some(invite) => match accounts.create_account_with_invite(user_id, name, invite).await {
                Ok(Some(created)) => Ok(created),
                Ok(None) => Err(ApiError::PermissionDenied(InviteError::Invalid.to_string())),
                Err(error) => Err(ApiError::from(error)),
            },
        };
        let created = match created {
            Ok(created) => created,
            Err(error) => {
                if !self.app.settings.kafka.delete_topics {
                    tracing::warn!(topic, "kafka.delete_topics is off: the topic of a failed account stays");
                } else if let Err(cleanup) = self.app.topics.delete_topic(&topic).await {
                    tracing::warn!(topic, error = %cleanup, "could not delete the topic of a failed account");
                }
                return Err(error.into());
            }
        };
        tracing::info!(user_id = created.user_id, device_id = created.device_id, "account created");
        self.app.events.device_added(&created.user_id, &created.device_id);
        Ok(Response::new(CreateAccountResponse {
            user_id: created.user_id,
            device_id: created.device_id,
            device_token: created.token,
        }))
    }

    async fn create_pairing_ticket(
        &self,
        request: Request<CreatePairingTicketRequest>,
    ) -> Result<Response<CreatePairingTicketResponse>, Status> {
        let device = authenticate(&self.app, &request)?;
        let (ticket, expires_at_ms) = self.app.accounts.create_pairing_ticket(&device).await.map_err(ApiError::from)?;
        Ok(Response::new(CreatePairingTicketResponse { ticket, expires_at_ms }))
    }

    async fn redeem_pairing_ticket(
        &self,
        request: Request<RedeemPairingTicketRequest>,
    ) -> Result<Response<RedeemPairingTicketResponse>, Status> {
        let request = request.into_inner();
        if request.ticket.is_empty() || request.ticket.len() > MAX_SECRET_CHARS {
            return Err(ApiError::InvalidArgument("ticket is missing or too long".into()).into());
        }
        let name = check_device_name(&request.device_name)?;
        let created = self.app.accounts.redeem_pairing_ticket(&request.ticket, name).await.map_err(ApiError::from)?;
        tracing::info!(user_id = created.user_id, device_id = created.device_id, "device paired");
        self.app.events.device_added(&created.user_id, &created.device_id);
        Ok(Response::new(RedeemPairingTicketResponse {
            user_id: created.user_id,
            device_id: created.device_id,
            device_token: created.token,
        }))
    }

    async fn list_devices(
        &self,
        request: Request<ListDevicesRequest>,
    ) -> Result<Response<ListDevicesResponse>, Status> {
        let caller = authenticate(&self.app, &request)?;
        let records = self.app.accounts.list_devices(&caller.user_id).await.map_err(ApiError::from)?;
        let mut devices = Vec::with_capacity(records.len());
        for record in records {
            let device = AuthedDevice { user_id: caller.user_id.clone(), device_id: record.device_id.as_str().into() };
            let committed_offset = self.app.delivery.committed_offset(&device).await?.unwrap_or(-1);
            devices.push(Device {
                device_id: record.device_id,
                name: record.name,
                created_at_ms: record.created_at_ms,
                revoked_at_ms: record.revoked_at_ms.unwrap_or(0),
                committed_offset,
            });
        }
        Ok(Response::new(ListDevicesResponse { devices }))
    }

    async fn revoke_device(
        &self,
        request: Request<RevokeDeviceRequest>,
    ) -> Result<Response<RevokeDeviceResponse>, Status> {
        let caller = authenticate(&self.app, &request)?;
        let device_id = &request.get_ref().device_id;
        if device_id.is_empty() || device_id.len() > 64 {
            return Err(ApiError::InvalidArgument("device_id is missing or too long".into()).into());
        }
        self.app.accounts.revoke_device(&caller.user_id, device_id).await.map_err(ApiError::from)?;
        self.app.delivery.revoke(device_id);
        self.app.events.device_revoked(&caller.user_id, device_id);
        let revoked = AuthedDevice { user_id: caller.user_id.clone(), device_id: device_id.as_str().into() };
        match self.app.push_targets.remove(&revoked, TargetRemovedReason::DeviceRevoked).await {
            Ok(()) | Err(TargetError::NotFound) => {}
            // The device is revoked; its target stays until the next revocation
            // attempt, and the push worker drops targets of revoked devices anyway.
            Err(error) => tracing::error!(%error, device_id, "could not remove a revoked device's push target"),
        }
        // Its offsets go too, in the background (the revocation holds either way, and its
        // answer does not wait for Kafka); best effort within the Kafka deadline.
        let (erasure, deadline, revoked_id) =
            (self.app.erasure.clone(), self.app.settings.kafka.operation_deadline, device_id.clone());
        tokio::spawn(async move {
            let deleted =
                bounded(deadline, "consumer group deletion", Retry::Never, || erasure.delete_device_group(&revoked_id));
            if deleted.await.is_err() {
                tracing::warn!(device_id = revoked_id, "could not delete a revoked device's consumer group");
            }
        });
        tracing::info!(user_id = %caller.user_id, device_id, revoked_by = %caller.device_id, "device revoked");
        Ok(Response::new(RevokeDeviceResponse {}))
    }

    async fn delete_account(
        &self,
        request: Request<DeleteAccountRequest>,
    ) -> Result<Response<DeleteAccountResponse>, Status> {
        let caller = authenticate(&self.app, &request)?;
        if request.get_ref().confirm_user_id != *caller.user_id {
            return Err(ApiError::InvalidArgument(
                "confirm_user_id must repeat this account's user id: deleting an account cannot be undone".into(),
            )
            .into());
        }
        let (purged, completed) =
            self.app.erasure.delete_account(&caller, DELETE_ACCOUNT_DEADLINE).await.map_err(ApiError::from)?;
        tracing::info!(user_id = %caller.user_id, by = %caller.device_id, completed, "account deleted by its device");
        Ok(Response::new(DeleteAccountResponse {
            topic_deleted: purged.topic_deleted,
            device_groups_deleted: purged.device_groups_deleted,
            devices_removed: purged.devices_removed,
            push_targets_removed: purged.push_targets_removed,
            dedup_entries_removed: purged.dedup_entries_removed,
            completed,
        }))
    }
}

/// How long DeleteAccount waits for Kafka before it answers `completed = false`.
const DELETE_ACCOUNT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(15);

pub struct SyncApi {
    app: App,
}

impl SyncApi {
    pub fn new(app: App) -> Self {
        Self { app }
    }

    async fn push_inner(&self, request: Request<PushRequest>) -> Result<Response<PushResponse>, Status> {
        let device = authenticate(&self.app, &request)?;
        let epochs: Vec<u32> = request.get_ref().changes.iter().map(|change| change.key_epoch).collect();
        self.app.keys.check_push_epochs(&device, epochs.into_iter()).await.map_err(ApiError::from)?;
        let results = self.app.gateway.push(&device, request.into_inner().changes).await?;
        Ok(Response::new(PushResponse { results }))
    }
}

#[tonic::async_trait]
/// Everything a Subscribe or an Ack waits for (watermarks, group offsets, the log guard) is
/// bounded by `kafka.operation_deadline`, then UNAVAILABLE; Kafka's transient trouble (a
/// partition without a leader for the seconds of an election or a broker restart, a group
/// coordinator still loading) is tried again within the same deadline rather than handed to
/// the device at once. Both calls are safe to repeat: they only read, or commit a position
/// the device already acknowledged.
impl sync_server::Sync for SyncApi {
    async fn push(&self, request: Request<PushRequest>) -> Result<Response<PushResponse>, Status> {
        let started = std::time::Instant::now();
        let span = if lockstep_telemetry::tracing_on() {
            let span = tracing::info_span!(
                target: lockstep_telemetry::TRACE_TARGET,
                "lockstep.push",
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.method = "Push",
                lockstep.changes = request.get_ref().changes.len(),
            );
            lockstep_telemetry::continue_from(request.metadata(), &span);
            span
        } else {
            tracing::Span::none()
        };
        let answer = self.push_inner(request).instrument(span).await;
        let code = answer.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok);
        metrics::counter!("lockstep_pushes_total", "code" => crate::error::code_name(code)).increment(1);
        metrics::histogram!("lockstep_push_duration_seconds").record(started.elapsed().as_secs_f64());
        answer
    }

    type SubscribeStream = SubscribeStream;

    async fn subscribe(&self, request: Request<SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        let device = authenticate(&self.app, &request)?;
        let SubscribeRequest { from_offset, repair } = request.into_inner();
        let subscribed = bounded(self.app.settings.kafka.operation_deadline, "subscribe", Retry::Transient, || {
            self.app.delivery.subscribe(device.clone(), from_offset, repair)
        });
        Ok(Response::new(subscribed.await?))
    }

    async fn ack(&self, request: Request<AckRequest>) -> Result<Response<AckResponse>, Status> {
        let device = authenticate(&self.app, &request)?;
        let committed_offset = bounded(self.app.settings.kafka.operation_deadline, "ack", Retry::Transient, || {
            self.app.delivery.ack(&device, request.get_ref().offset)
        })
        .await?;
        Ok(Response::new(AckResponse { committed_offset }))
    }

    async fn get_server_info(
        &self,
        _request: Request<GetServerInfoRequest>,
    ) -> Result<Response<GetServerInfoResponse>, Status> {
        let settings = &self.app.settings;
        Ok(Response::new(GetServerInfoResponse {
            server_version: env!("CARGO_PKG_VERSION").into(),
            max_changes_per_push: settings.limits.max_changes_per_push,
            max_ciphertext_bytes: settings.limits.max_ciphertext_bytes,
            max_request_bytes: settings.limits.max_request_bytes,
            heartbeat_interval_ms: millis(settings.delivery.heartbeat_interval),
            max_change_id_chars: MAX_CHANGE_ID_CHARS as u32,
            max_record_id_chars: MAX_RECORD_ID_CHARS as u32,
            max_batch_bytes: settings.delivery.batch_max_bytes as u32,
            vapid_public_key: settings.push.vapid_public_key.clone().unwrap_or_default(),
            registration: registration_mode_proto(settings.accounts.registration_mode(settings.listen_addr)).into(),
            max_devices_per_account: settings.accounts.max_devices_per_account,
            push_rate_limit: Some(RateLimit {
                burst: settings.rate_limits.push_per_account.burst,
                per_hour: settings.rate_limits.push_per_account.per_hour,
            }),
            max_subscriptions_per_user: settings.limits.max_subscriptions_per_user,
            request_timeout_ms: millis(settings.limits.request_timeout),
            stream_send_timeout_ms: millis(settings.delivery.send_timeout),
            max_concurrent_requests_per_device: settings.limits.max_concurrent_requests_per_device,
        }))
    }
}

pub struct PushTargetsApi {
    app: App,
}

impl PushTargetsApi {
    pub fn new(app: App) -> Self {
        Self { app }
    }
}

/// The proto's target, as the device sent it (unvalidated).
fn target_from_proto(target: Option<lockstep_proto::v1::PushTarget>) -> Result<PushTarget, ApiError> {
    match target.and_then(|target| target.target) {
        Some(push_target::Target::WebPush(WebPushTarget { endpoint, p256dh, auth })) => {
            Ok(PushTarget::WebPush { endpoint, p256dh: p256dh.to_vec(), auth: auth.to_vec() })
        }
        Some(push_target::Target::Webhook(WebhookTarget { url, app_id, pushkey })) => {
            Ok(PushTarget::Webhook { url, app_id, pushkey })
        }
        None => Err(ApiError::InvalidArgument("target is missing: set web_push or webhook".into())),
    }
}

fn target_to_proto(stored: StoredTarget) -> lockstep_proto::v1::PushTarget {
    let target = match stored.target {
        PushTarget::WebPush { endpoint, p256dh, auth } => {
            push_target::Target::WebPush(WebPushTarget { endpoint, p256dh: p256dh.into(), auth: auth.into() })
        }
        PushTarget::Webhook { url, app_id, pushkey } => {
            push_target::Target::Webhook(WebhookTarget { url, app_id, pushkey })
        }
    };
    lockstep_proto::v1::PushTarget { target: Some(target), updated_at_ms: stored.updated_at_ms }
}

#[tonic::async_trait]
impl push_targets_server::PushTargets for PushTargetsApi {
    async fn set_push_target(
        &self,
        request: Request<SetPushTargetRequest>,
    ) -> Result<Response<SetPushTargetResponse>, Status> {
        let device = authenticate(&self.app, &request)?;
        let target = target_from_proto(request.into_inner().target)?;
        self.app.push_targets.set(&device, target).await.map_err(ApiError::from)?;
        Ok(Response::new(SetPushTargetResponse {}))
    }

    async fn get_push_target(
        &self,
        request: Request<GetPushTargetRequest>,
    ) -> Result<Response<GetPushTargetResponse>, Status> {
        let device = authenticate(&self.app, &request)?;
        let stored = self.app.push_targets.get(&device).await.map_err(ApiError::from)?;
        Ok(Response::new(GetPushTargetResponse { target: Some(target_to_proto(stored)) }))
    }

    async fn remove_push_target(
        &self,
        request: Request<RemovePushTargetRequest>,
    ) -> Result<Response<RemovePushTargetResponse>, Status> {
        let device = authenticate(&self.app, &request)?;
        self.app.push_targets.remove(&device, TargetRemovedReason::RemovedByDevice).await.map_err(ApiError::from)?;
        Ok(Response::new(RemovePushTargetResponse {}))
    }
}
