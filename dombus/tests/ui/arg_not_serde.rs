pub struct Disk {
    pub size: u64,
}

#[dombus::service]
pub trait Storage {
    async fn create(&self, name: String, disk: Disk) -> bool;
}

fn main() {}
