#[dombus::service]
pub trait Store {
    async fn merge(&self, other: Box<Self>) -> bool;
}

fn main() {}
