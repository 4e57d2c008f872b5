#[dombus::service]
pub trait Feed {
    #[idempotent]
    async fn changes(&self) -> dombus::Events<u64>;
    async fn since(&self, from: u64, count: u32) -> dombus::Events<u64>;
}

fn main() {}
