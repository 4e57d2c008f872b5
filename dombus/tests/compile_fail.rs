//! `#[dombus::service]` on traits it cannot turn into a service: each is a compile error spanned
//! on the offending tokens (snapshots in `tests/ui/*.stderr`), while the accepted edge cases in
//! `tests/ui-pass/` compile. Regenerate the snapshots with `TRYBUILD=overwrite`.

#[test]
fn service_macro_diagnostics() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
    t.pass("tests/ui-pass/*.rs");
}
