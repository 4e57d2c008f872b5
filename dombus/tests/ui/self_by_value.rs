#[dombus::service]
pub trait Store {
    async fn get(self, key: String) -> Option<String>;
}

fn main() {}
