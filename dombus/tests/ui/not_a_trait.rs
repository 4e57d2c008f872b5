#[dombus::service]
pub struct Store;

fn main() {}
