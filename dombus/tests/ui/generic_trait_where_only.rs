// A trait with a `where` clause but no generic parameters.
#[dombus::service]
pub trait Store
where
    Self: Sized,
{
    async fn get(&self, key: String) -> Option<String>;
}

fn main() {}
