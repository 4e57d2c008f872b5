// A method with a `where` clause but no generic parameters.
#[dombus::service]
pub trait Store {
    async fn get(&self, key: String) -> Option<String>
    where
        Self: Sized;
}

fn main() {}
