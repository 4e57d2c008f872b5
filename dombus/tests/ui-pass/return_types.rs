// `Option`, `bool`, unit and `Result<T, E>` (with the author's own serde error enum) results.
use serde::{Deserialize, Serialize};

/// Why a volume operation failed.
#[derive(Debug, Serialize, Deserialize)]
pub enum VolumeError {
    NotFound { name: String },
    NoSpace(u64),
    ReadOnly,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Volume {
    pub name: String,
    pub size: u64,
}

/// Volumes.
#[dombus::service(name = "volumes", version = 2)]
pub trait Volumes {
    /// The volume called `name`, if any.
    #[idempotent]
    async fn find(&self, name: String) -> Option<Volume>;
    /// Whether `name` exists.
    #[idempotent]
    async fn exists(&self, name: String) -> bool;
    /// Flushes everything; returns nothing.
    async fn flush(&self);
    /// Unit result, spelled out, with no arguments at all.
    async fn sync(&self) -> ();
    /// Creates a volume.
    async fn create(&self, name: String, size: u64, sparse: bool) -> Result<Volume, VolumeError>;
    /// Removes a volume.
    async fn remove(&self, name: String) -> std::result::Result<(), VolumeError>;
}

pub struct Impl;

impl Volumes for Impl {
    async fn find(&self, _name: String) -> Option<Volume> {
        None
    }
    async fn exists(&self, _name: String) -> bool {
        false
    }
    async fn flush(&self) {}
    async fn sync(&self) {}
    async fn create(&self, name: String, size: u64, _sparse: bool) -> Result<Volume, VolumeError> {
        if size == 0 { Err(VolumeError::NoSpace(size)) } else { Ok(Volume { name, size }) }
    }
    async fn remove(&self, name: String) -> Result<(), VolumeError> {
        Err(VolumeError::NotFound { name })
    }
}

pub async fn call(client: VolumesClient) -> Result<(), tarpc::client::RpcError> {
    let ctx = dombus::context::current;
    let _: Option<Volume> = client.find(ctx(), "a".into()).await?;
    let _: bool = client.exists(ctx(), "a".into()).await?;
    client.flush(ctx()).await?;
    client.sync(ctx()).await?;
    let _: Result<Volume, VolumeError> = client.create(ctx(), "a".into(), 1, true).await?;
    let _: Result<(), VolumeError> = client.remove(ctx(), "a".into()).await?;
    Ok(())
}

fn main() {
    let _ = Impl.into_service();
}
