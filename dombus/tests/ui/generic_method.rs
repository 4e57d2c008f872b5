#[dombus::service]
pub trait Store {
    async fn get<T>(&self, key: String) -> Option<String>;
}

fn main() {}
