#[dombus::service]
pub trait Store {
    async fn into_service(&self) -> u32;
}

fn main() {}
