#[dombus::service]
pub trait Store {
    async fn get_many(&self, keys: Vec<&'static str>) -> Vec<String>;
}

fn main() {}
