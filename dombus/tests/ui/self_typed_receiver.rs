#[dombus::service]
pub trait Store {
    async fn get(self: std::sync::Arc<Self>, key: String) -> Option<String>;
}

fn main() {}
