#[dombus::service]
pub trait Store {
    #[idempotent(x)]
    async fn get(&self, key: String) -> Option<String>;
    #[idempotent = true]
    async fn len(&self) -> u64;
}

fn main() {}
