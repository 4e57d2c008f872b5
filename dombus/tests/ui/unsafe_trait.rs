#[dombus::service]
pub unsafe trait Store {
    async unsafe fn get(&self, key: String) -> Option<String>;
    const fn len(&self) -> u64;
    async extern "C" fn clear(&self);
}

fn main() {}
