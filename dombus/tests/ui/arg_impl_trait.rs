#[dombus::service]
pub trait Store {
    async fn get(&self, key: impl Into<String>) -> Option<String>;
}

fn main() {}
