// A service trait declared inside a function body, implemented and served there.
fn main() {
    /// Counts.
    #[dombus::service(name = "counter", version = 3)]
    trait Counter {
        /// Adds `by`; returns the new total.
        async fn add(&self, by: u64) -> u64;
    }

    struct Impl;

    impl Counter for Impl {
        async fn add(&self, by: u64) -> u64 {
            by
        }
    }

    let _service: dombus::rpc::Service = Impl.into_service();
    let _client: fn(dombus::Net, dombus::Address) -> CounterClient = CounterClient::new;
}
