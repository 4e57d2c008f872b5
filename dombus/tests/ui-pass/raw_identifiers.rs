// Raw identifiers as trait, method and argument names.
#![allow(non_camel_case_types)]

#[dombus::service]
pub trait r#Match {
    async fn r#type(&self, r#in: String, r#where: Option<u32>) -> String;
    async fn r#loop(&self, r#async: bool);
}

pub struct Impl;

impl r#Match for Impl {
    async fn r#type(&self, r#in: String, _where: Option<u32>) -> String {
        r#in
    }
    async fn r#loop(&self, _async: bool) {}
}

pub async fn call(client: MatchClient) -> Result<String, tarpc::client::RpcError> {
    client.r#loop(dombus::context::current(), true).await?;
    client.r#type(dombus::context::current(), "x".into(), None).await
}

fn main() {
    let _ = Impl.into_service();
}
