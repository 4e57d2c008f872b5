#[dombus::service]
pub trait Store {
    async fn get(&self, key: Box<dyn std::fmt::Display>) -> Option<String>;
}

fn main() {}
