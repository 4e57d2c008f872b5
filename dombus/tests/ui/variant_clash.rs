// Two methods whose generated variant names are both `GetKey`.
#[dombus::service]
pub trait Store {
    async fn get_key(&self) -> String;
    async fn get__key(&self) -> String;
}

fn main() {}
