#[dombus::service(name = kv)]
pub trait Store {
    async fn get(&self, key: String) -> Option<String>;
}

#[dombus::service(version = "2")]
pub trait Other {
    async fn get(&self, key: String) -> Option<String>;
}

#[dombus::service(version = 4294967296)]
pub trait Third {
    async fn get(&self, key: String) -> Option<String>;
}

fn main() {}
