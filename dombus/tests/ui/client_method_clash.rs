// `new`, `with_config` and `connect` are inherent methods of the generated client.
#[dombus::service]
pub trait Store {
    async fn new(&self, key: String) -> bool;
    async fn connect(&self, peer: String) -> bool;
}

fn main() {}
