#[dombus::service]
pub trait Store: Clone + std::fmt::Debug {
    async fn get(&self, key: String) -> Option<String>;
}

fn main() {}
