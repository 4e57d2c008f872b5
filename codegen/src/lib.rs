//! `#[dombus::service]`: from a trait of `async fn(&self, …)` methods, the typed client, the
//! server dispatch, a descriptor, stable method identity on the wire and CLI glue.
//!
//! Use it through the `dombus` crate (`#[dombus::service]`), whose `__private` module the
//! generated code refers to, so that a service crate depends on `dombus` alone. What is
//! generated, and why tarpc's own `#[tarpc::service]` is not invoked, is in `docs/codegen.md`.

use proc_macro::TokenStream;

mod expand;
mod model;

/// Turns a trait into a dombus service. See the `dombus` crate and `docs/codegen.md`.
///
/// ```ignore
/// #[dombus::service(name = "greeter", version = 2)]
/// pub trait Greeter {
///     /// Says hello.
///     #[idempotent]
///     async fn hello(&self, name: String) -> String;
/// }
/// ```
#[proc_macro_attribute]
pub fn service(attr: TokenStream, item: TokenStream) -> TokenStream {
    match expand::expand(attr.into(), item.into()) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}
