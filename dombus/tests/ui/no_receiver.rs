#[dombus::service]
pub trait Store {
    async fn get(key: String) -> Option<String>;
}

fn main() {}
