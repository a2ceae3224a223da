//! The Keys service: device public keys and sealed epoch keys (see `keys`).

use lockstep_proto::v1::{
    DeviceKey, GetEpochKeysRequest, GetEpochKeysResponse, ListDeviceKeysRequest, ListDeviceKeysResponse,
    RegisterDeviceKeyRequest, RegisterDeviceKeyResponse, SealedEpochKey, ShareEpochKeysRequest, ShareEpochKeysResponse,
    StartKeyEpochRequest, StartKeyEpochResponse, keys_server,
};
use tonic::{Request, Response, Status};

use super::{App, api::authenticate};
use crate::{error::ApiError, keys::SealedKey};

pub struct KeysApi {
    app: App,
}

impl KeysApi {
    pub fn new(app: App) -> Self {
        Self { app }
    }
}

fn from_proto(sealed: SealedEpochKey) -> SealedKey {
    SealedKey {
        device_id: sealed.device_id,
        epoch: sealed.epoch,
        sealed: sealed.sealed.to_vec(),
        sealed_by_device_id: String::new(),
    }
}

#[tonic::async_trait]
impl keys_server::Keys for KeysApi {
    async fn register_device_key(
        &self,
        request: Request<RegisterDeviceKeyRequest>,
    ) -> Result<Response<RegisterDeviceKeyResponse>, Status> {
        let device = authenticate(&self.app, &request)?;
        let RegisterDeviceKeyRequest { public_key, proof } = request.into_inner();
        let current_epoch =
            self.app.keys.register(&device, public_key.to_vec(), proof.to_vec()).await.map_err(ApiError::from)?;
        tracing::info!(user_id = %device.user_id, device_id = %device.device_id, "device key registered");
        Ok(Response::new(RegisterDeviceKeyResponse { current_epoch }))
    }

    async fn list_device_keys(
        &self,
        request: Request<ListDeviceKeysRequest>,
    ) -> Result<Response<ListDeviceKeysResponse>, Status> {
        let device = authenticate(&self.app, &request)?;
        let listed = self.app.keys.list(&device.user_id).await.map_err(ApiError::from)?;
        let devices = listed
            .devices
            .into_iter()
            .map(|entry| DeviceKey {
                device_id: entry.device_id,
                public_key: entry.public_key.into(),
                proof: entry.proof.into(),
                missing_epochs: entry.missing_epochs,
            })
            .collect();
        Ok(Response::new(ListDeviceKeysResponse {
            current_epoch: listed.current_epoch,
            devices,
            rotation_due: listed.rotation_due,
        }))
    }

    async fn start_key_epoch(
        &self,
        request: Request<StartKeyEpochRequest>,
    ) -> Result<Response<StartKeyEpochResponse>, Status> {
        let device = authenticate(&self.app, &request)?;
        let StartKeyEpochRequest { epoch, sealed_keys } = request.into_inner();
        let sealed_keys = sealed_keys.into_iter().map(from_proto).collect::<Vec<_>>();
        let recipients = sealed_keys.len();
        let current_epoch = self.app.keys.start_epoch(&device, epoch, sealed_keys).await.map_err(ApiError::from)?;
        tracing::info!(
            user_id = %device.user_id,
            started_by = %device.device_id,
            epoch = current_epoch,
            recipients,
            "key epoch started"
        );
        Ok(Response::new(StartKeyEpochResponse { current_epoch }))
    }

    async fn share_epoch_keys(
        &self,
        request: Request<ShareEpochKeysRequest>,
    ) -> Result<Response<ShareEpochKeysResponse>, Status> {
        let device = authenticate(&self.app, &request)?;
        let sealed_keys = request.into_inner().sealed_keys.into_iter().map(from_proto).collect();
        let stored = self.app.keys.share(&device, sealed_keys).await.map_err(ApiError::from)?;
        Ok(Response::new(ShareEpochKeysResponse { stored }))
    }

    async fn get_epoch_keys(
        &self,
        request: Request<GetEpochKeysRequest>,
    ) -> Result<Response<GetEpochKeysResponse>, Status> {
        let device = authenticate(&self.app, &request)?;
        let GetEpochKeysRequest { since_epoch, unopened_epochs } = request.into_inner();
        let got = self.app.keys.get(&device, since_epoch, unopened_epochs).await.map_err(ApiError::from)?;
        let sealed_keys = got
            .sealed_keys
            .into_iter()
            .map(|key| SealedEpochKey {
                device_id: key.device_id,
                epoch: key.epoch,
                sealed: key.sealed.into(),
                sealed_by_device_id: key.sealed_by_device_id,
            })
            .collect();
        Ok(Response::new(GetEpochKeysResponse {
            current_epoch: got.current_epoch,
            sealed_keys,
            more: got.more,
            rotation_due: got.rotation_due,
        }))
    }
}
