#[dombus::service]
pub trait Store: Send {
    type Key;
    fn get<T>(&self, key: &str) -> Option<String>;
    async fn put(&mut self, ctx: String, value: impl Into<String>);
    async fn wipe(self) {}
    #[idempotent(always)]
    async fn scan(prefix: Vec<&'static str>) -> Vec<String>;
}

fn main() {}
