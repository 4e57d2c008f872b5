#[dombus::service]
pub trait Store<K> {
    async fn get(&self, key: String) -> Option<String>;
}

fn main() {}
