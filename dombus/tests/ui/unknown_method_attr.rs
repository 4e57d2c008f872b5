#[dombus::service]
pub trait Store {
    #[idempotnt]
    async fn get(&self, key: String) -> Option<String>;
}

fn main() {}
