#[dombus::service]
pub trait Store {}

fn main() {}
