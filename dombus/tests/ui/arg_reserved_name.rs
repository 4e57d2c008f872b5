#[dombus::service]
pub trait Store {
    async fn get(&self, ctx: String) -> Option<String>;
    async fn load(&self, stdin: String, help: bool, __raw: u32);
}

fn main() {}
