#[dombus::service]
pub trait Store {
    async fn get(&self, key: String) -> Option<String>;
    #[cfg(feature = "admin")]
    async fn wipe(&self);
}

fn main() {}
