//! What the network module's unit tests share: whether this machine lets them make network
//! namespaces, failing where every test must run instead of skipping.
#![allow(clippy::unwrap_used)]

use std::io::Write as _;

use super::netns::{Namespace, run_in};

/// True where every test must run: in CI (`CI` set) and under `scripts/test-all`
/// (`DOMBUS_TEST_REQUIRE_ALL=1`).
fn all_required() -> bool {
    let set = |v: &str| std::env::var(v).is_ok_and(|s| !s.is_empty() && s != "0" && s != "false");
    set("CI") || set("DOMBUS_TEST_REQUIRE_ALL")
}

/// Whether `test` can run: this process may make network namespaces (it is root). Where it
/// may not, a failure where every test must run, else a loud note, and false.
pub(crate) fn namespaces_or_skip(test: &str) -> bool {
    let Err(e) = run_in(Namespace::New, || ()) else { return true };
    assert!(!all_required(), "{test}: cannot make a network namespace: {e} (every test must run)");
    let _ = writeln!(
        std::io::stderr().lock(),
        "\n*** SKIPPED {test}: cannot make a network namespace ({e}): this test did NOT run ***\n"
    );
    false
}

/// Runs the future `work` makes inside a new network namespace of its own.
pub(crate) fn in_new_namespace<T, F, Fut>(work: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    super::netns::block_on_in(Namespace::New, work).unwrap()
}
