use dombus::Events;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub enum Change {
    Added(String),
    Removed(String),
}

#[dombus::service]
pub trait Feed {
    /// A call beside the streams.
    async fn add(&self, name: String);
    /// Without a snapshot.
    async fn ticks(&self) -> Events<u64>;
    /// With a snapshot, by path, filtered by an argument.
    async fn changes(&self, prefix: Option<String>) -> dombus::Events<Change, Vec<String>>;
}

fn subscriptions(client: &FeedClient) {
    let _: dombus::Subscription<u64, ()> = client.ticks();
    let _: dombus::Subscription<Change, Vec<String>> = client.changes(None).max_events(8);
}

fn main() {
    let _ = subscriptions;
}
