// The implementation of a rejected trait adds no errors of its own: only the macro's is shown.
#[dombus::service]
pub trait Store {
    async fn get(&self, key: &str) -> Option<String>;
}

pub struct Impl;

impl Store for Impl {
    async fn get(&self, _key: &str) -> Option<String> {
        None
    }
}

fn main() {}
