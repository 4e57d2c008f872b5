pub struct Disk {
    pub size: u64,
}

#[dombus::service]
pub trait Storage {
    async fn get(&self, name: String) -> Option<Disk>;
}

fn main() {}
