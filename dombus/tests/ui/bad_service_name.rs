#[dombus::service(name = "key value store")]
pub trait Store {
    async fn get(&self, key: String) -> Option<String>;
}

#[dombus::service(name = "")]
pub trait Empty {
    async fn get(&self, key: String) -> Option<String>;
}

#[dombus::service(name = "dombus")]
pub trait Reserved {
    async fn get(&self, key: String) -> Option<String>;
}

fn main() {}
