// A lifetime with no reference: `Cow<'static, str>`.
#[dombus::service]
pub trait Store {
    async fn get(&self, key: std::borrow::Cow<'static, str>) -> Option<String>;
}

fn main() {}
