// `cfg_attr` is passed through to the generated code, where `idempotent` is no attribute.
#[dombus::service]
pub trait Store {
    #[cfg_attr(all(), idempotent)]
    async fn get(&self, key: String) -> Option<String>;
}

fn main() {}
