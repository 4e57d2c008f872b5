#[dombus::service]
pub trait Store {
    async fn put(&self, (key, value): (String, String)) -> bool;
    async fn touch(&self, mut key: String) -> bool;
    async fn ping(&self, _: u32);
}

fn main() {}
