//! The service a trait describes, checked: everything the macro cannot turn into a service is a
//! compile error spanned on the offending part, all of them reported at once.

use heck::ToKebabCase;
use proc_macro2::{Span, TokenStream, TokenTree};
use quote::{ToTokens, format_ident};
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{
    Attribute, Expr, FnArg, Ident, ItemTrait, Lit, LitInt, LitStr, Pat, ReturnType, TraitItem, Type,
    Visibility,
};

/// `#[dombus::service(name = "…", version = N)]`.
#[derive(Default)]
pub struct Options {
    pub name: Option<LitStr>,
    pub version: Option<LitInt>,
}

impl Options {
    pub fn parse(attr: TokenStream) -> syn::Result<Options> {
        let mut options = Options::default();
        let parser = syn::meta::parser(|meta| {
            if meta.path.is_ident("name") {
                options.name = Some(meta.value()?.parse()?);
                Ok(())
            } else if meta.path.is_ident("version") {
                options.version = Some(meta.value()?.parse()?);
                Ok(())
            } else {
                Err(meta.error("unknown option: #[dombus::service] takes `name = \"…\"` and `version = N`"))
            }
        });
        syn::parse::Parser::parse2(parser, attr)?;
        Ok(options)
    }
}

/// How a method argument appears on the command line.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum CliKind {
    Required,
    Optional,
    Switch,
}

pub struct Arg {
    pub ident: Ident,
    pub ty: Type,
    /// The type as written, tidied (`Option<String>`).
    pub ty_name: String,
    pub cli: CliKind,
}

pub struct Method {
    pub ident: Ident,
    /// The name on the wire: the method's identity.
    pub wire: String,
    /// `CreateDisk` for `create_disk`.
    pub variant: Ident,
    pub args: Vec<Arg>,
    pub output: Type,
    pub output_name: String,
    /// The output is a `Result` (its `Err` is the service's error, shown as such by the CLI).
    pub returns_result: bool,
    /// The output is `Events<T>` or `Events<T, S>`: a stream method, polled by subscriptions.
    pub stream: bool,
    pub idempotent: bool,
    pub doc: String,
    /// Attributes kept on the trait's method (docs, lints).
    pub attrs: Vec<Attribute>,
}

pub struct Service {
    pub vis: Visibility,
    pub ident: Ident,
    pub name: String,
    pub version: u32,
    pub doc: String,
    pub attrs: Vec<Attribute>,
    pub methods: Vec<Method>,
}

/// Collects errors so that all are reported at once.
#[derive(Default)]
struct Errors(Option<syn::Error>);

impl Errors {
    fn push(&mut self, span: Span, msg: impl std::fmt::Display) {
        let e = syn::Error::new(span, msg);
        match &mut self.0 {
            Some(all) => all.combine(e),
            None => self.0 = Some(e),
        }
    }
    fn push_tokens(&mut self, tokens: impl ToTokens, msg: impl std::fmt::Display) {
        let e = syn::Error::new_spanned(tokens, msg);
        match &mut self.0 {
            Some(all) => all.combine(e),
            None => self.0 = Some(e),
        }
    }
    fn finish(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

/// Argument names the generated code needs for itself.
const RESERVED_ARGS: &[&str] = &["ctx", "stdin", "help"];
/// Argument names a stream method's command line needs for itself.
const STREAM_RESERVED_ARGS: &[&str] = &["from", "count"];
/// Method names the generated trait or client has already (`client.clone()` must stay
/// `Clone::clone`).
const RESERVED_METHODS: &[&str] =
    &["into_service", "new", "with_config", "connect", "clone", "clone_from", "fmt", "from"];

impl Service {
    pub fn new(item: ItemTrait, options: Options) -> syn::Result<Service> {
        let mut errors = Errors::default();
        if let Some(u) = &item.unsafety {
            errors.push(u.span(), "a dombus service trait cannot be `unsafe`");
        }
        if let Some(a) = &item.auto_token {
            errors.push(a.span(), "a dombus service trait cannot be an auto trait");
        }
        if !item.generics.params.is_empty() {
            errors.push_tokens(
                &item.generics,
                "a dombus service trait cannot be generic: its methods are called from other domains, with concrete types",
            );
        } else if let Some(w) = &item.generics.where_clause {
            errors.push_tokens(w, "a dombus service trait cannot have a `where` clause");
        }
        if !item.supertraits.is_empty() {
            errors.push_tokens(
                &item.supertraits,
                "a dombus service trait cannot have supertraits (it is given `Send + Sync + 'static`)",
            );
        }
        let name = match &options.name {
            Some(n) => n.value(),
            None => item.ident.unraw().to_string().to_kebab_case(),
        };
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name != "dombus"
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !name_ok {
            let span = options.name.as_ref().map_or(item.ident.span(), |n| n.span());
            errors.push(
                span,
                format!(
                    "{name:?}: a service name is 1 to 64 characters of A-Z a-z 0-9 _ . - (and not \"dombus\")"
                ),
            );
        }
        let version = match &options.version {
            Some(v) => v.base10_parse::<u32>().unwrap_or_else(|e| {
                errors.push(v.span(), format!("`version` is a u32 (0 to 4294967295): {e}"));
                0
            }),
            None => 1,
        };
        let mut methods = Vec::new();
        for trait_item in item.items {
            match trait_item {
                TraitItem::Fn(f) => {
                    if let Some(m) = method(f, &mut errors) {
                        methods.push(m);
                    }
                }
                other => errors.push_tokens(other, "a dombus service trait holds only `async fn` methods"),
            }
        }
        let mut variants = std::collections::HashMap::new();
        for m in &methods {
            if let Some(first) = variants.insert(m.variant.to_string(), m.wire.clone()) {
                errors.push(
                    m.ident.span(),
                    format!(
                        "`{}` and `{first}` both become the variant `{}` of the request enum; rename one",
                        m.wire, m.variant
                    ),
                );
            }
        }
        if methods.is_empty() && errors.0.is_none() {
            errors.push(item.ident.span(), "a dombus service needs at least one method");
        }
        errors.finish()?;
        let (doc, attrs) = split_docs(item.attrs);
        Ok(Service { vis: item.vis, ident: item.ident, name, version, doc, attrs, methods })
    }
}

fn method(f: syn::TraitItemFn, errors: &mut Errors) -> Option<Method> {
    let sig = &f.sig;
    let ident = sig.ident.clone();
    let wire = ident.unraw().to_string();
    let before = errors.0.is_some();
    if let Some(body) = &f.default {
        errors.push_tokens(
            body,
            "service methods are declared here, not defined: implement them in `impl Trait for YourType`",
        );
    }
    if sig.asyncness.is_none() {
        errors.push(
            sig.fn_token.span(),
            format!("service methods are `async fn`: `async fn {wire}(&self, …)`"),
        );
    }
    if let Some(c) = &sig.constness {
        errors.push(c.span(), "service methods cannot be `const`");
    }
    if let Some(u) = &sig.unsafety {
        errors.push(u.span(), "service methods cannot be `unsafe`");
    }
    if let Some(a) = &sig.abi {
        errors.push_tokens(a, "service methods cannot have an ABI");
    }
    if !sig.generics.params.is_empty() {
        errors.push_tokens(
            &sig.generics,
            "service methods cannot be generic: a call from another domain carries concrete types",
        );
    } else if let Some(w) = &sig.generics.where_clause {
        errors.push_tokens(w, "service methods cannot have a `where` clause: their types are concrete");
    }
    if let Some(v) = &sig.variadic {
        errors.push_tokens(v, "service methods cannot be variadic");
    }
    if RESERVED_METHODS.contains(&wire.as_str()) {
        errors.push(
            ident.span(),
            format!(
                "`{wire}` is taken by the generated trait or client (or `Clone`/`Debug`); choose another name"
            ),
        );
    }
    let mut inputs = sig.inputs.iter();
    match inputs.next() {
        Some(FnArg::Receiver(r))
            if r.colon_token.is_none() && r.reference.is_some() && r.mutability.is_none() =>
        {
            if let Some((_, Some(l))) = &r.reference {
                errors.push(l.span(), "take plain `&self` (no lifetime)");
            }
        }
        Some(FnArg::Receiver(r)) if r.mutability.is_some() && r.reference.is_some() => {
            errors.push_tokens(r, "service methods take `&self`, not `&mut self`: calls run concurrently");
        }
        Some(FnArg::Receiver(r)) => {
            errors.push_tokens(r, "service methods take `&self`");
        }
        _ => errors.push(
            sig.paren_token.span.join(),
            format!("service methods take `&self` first: `async fn {wire}(&self, …)`"),
        ),
    }
    let mut args = Vec::new();
    for input in inputs {
        let FnArg::Typed(pt) = input else {
            errors.push_tokens(input, "`self` can only come first");
            continue;
        };
        let arg_ident = match &*pt.pat {
            Pat::Ident(p) if p.by_ref.is_none() && p.mutability.is_none() && p.subpat.is_none() => {
                p.ident.clone()
            }
            other => {
                errors.push_tokens(
                    other,
                    "arguments need plain names: they become fields on the wire and CLI flags",
                );
                continue;
            }
        };
        let arg_name = arg_ident.unraw().to_string();
        if RESERVED_ARGS.contains(&arg_name.as_str()) || arg_name.starts_with("__") {
            errors.push(
                arg_ident.span(),
                format!("`{arg_name}` is reserved for the generated code (`ctx`, `stdin`, `help`, `__…`); rename it"),
            );
        }
        check_owned(&pt.ty, errors, "arguments");
        let cli = cli_kind(&pt.ty);
        args.push(Arg { ident: arg_ident, ty_name: type_name(&pt.ty), ty: (*pt.ty).clone(), cli });
    }
    let output: Type = match &sig.output {
        ReturnType::Default => syn::parse_quote!(()),
        ReturnType::Type(_, ty) => (**ty).clone(),
    };
    check_owned(&output, errors, "results");
    let stream = is_events(&output);
    if stream {
        for a in &args {
            let n = a.ident.unraw().to_string();
            if STREAM_RESERVED_ARGS.contains(&n.as_str()) {
                errors.push(
                    a.ident.span(),
                    format!("`{n}` is taken by a stream's command line (`--from`, `--count`); rename it"),
                );
            }
        }
    }
    let mut idempotent = false;
    let mut attrs = Vec::new();
    for attr in f.attrs {
        if attr.path().is_ident("idempotent") {
            if attr.meta.require_path_only().is_err() {
                errors.push_tokens(&attr, "`#[idempotent]` takes no arguments");
            }
            if stream {
                errors.push_tokens(
                    &attr,
                    "a stream method (returning `Events`) is polled from a cursor, so always safe to repeat: \
                     `#[idempotent]` does not apply",
                );
            }
            idempotent = true;
        } else if attr.path().is_ident("cfg") || attr.path().is_ident("cfg_attr") {
            errors.push_tokens(
                &attr,
                "`#[cfg]` and `#[cfg_attr]` on a service method are not supported: a service's methods and their \
                 attributes must not depend on build features",
            );
        } else {
            attrs.push(attr);
        }
    }
    if errors.0.is_some() && !before {
        return None;
    }
    let (doc, attrs) = split_docs(attrs);
    let variant =
        format_ident!("{}", heck::ToUpperCamelCase::to_upper_camel_case(wire.as_str()), span = ident.span());
    Some(Method {
        ident,
        wire,
        variant,
        args,
        output_name: type_name(&output),
        returns_result: is_result(&output),
        stream,
        output,
        idempotent,
        doc,
        attrs,
    })
}

/// Arguments and results cross a domain boundary: no borrows, no `impl Trait`, no `Self`.
fn check_owned(ty: &Type, errors: &mut Errors, what: &str) {
    match ty {
        Type::Reference(r) => {
            errors.push_tokens(
                r,
                format!("{what} cross a domain boundary: take owned types (`String`, not `&str`)"),
            );
            return;
        }
        Type::ImplTrait(i) => {
            errors.push_tokens(i, format!("{what} need a concrete type, not `impl Trait`"));
            return;
        }
        Type::TraitObject(t) => {
            errors.push_tokens(t, format!("{what} need a concrete serializable type, not a trait object"));
            return;
        }
        _ => {}
    }
    fn walk(tokens: TokenStream, errors: &mut Errors, what: &str) -> bool {
        for tt in tokens {
            match tt {
                TokenTree::Group(g) if walk(g.stream(), errors, what) => return true,
                TokenTree::Punct(p) if p.as_char() == '&' => {
                    errors
                        .push(p.span(), format!("{what} cross a domain boundary: no references inside them"));
                    return true;
                }
                TokenTree::Punct(p) if p.as_char() == '\'' => {
                    errors
                        .push(p.span(), format!("{what} cross a domain boundary: no lifetimes inside them"));
                    return true;
                }
                TokenTree::Ident(i) if i == "Self" => {
                    errors.push(
                        i.span(),
                        format!("{what} cannot name `Self`: the client has no implementing type"),
                    );
                    return true;
                }
                TokenTree::Ident(i) if i == "impl" || i == "dyn" => {
                    errors
                        .push(i.span(), format!("{what} need concrete serializable types, not `{i} Trait`"));
                    return true;
                }
                _ => {}
            }
        }
        false
    }
    walk(ty.to_token_stream(), errors, what);
}

fn last_segment(ty: &Type) -> Option<&syn::PathSegment> {
    match ty {
        Type::Path(p) if p.qself.is_none() => p.path.segments.last(),
        _ => None,
    }
}

/// Whether `ty` is `Vec<u8>` as written (`Vec`, `std::vec::Vec` or `alloc::vec::Vec` of
/// `u8`). Such arguments and results are encoded as serde bytes — one copy, not a serializer
/// call per byte — which bincode and postcard put on the wire exactly as a sequence of `u8`, so
/// peers built before or after agree.
pub fn is_byte_vec(ty: &Type) -> bool {
    let Type::Path(p) = ty else { return false };
    let names: Vec<String> = p.path.segments.iter().map(|s| s.ident.to_string()).collect();
    let std_path = matches!(names.as_slice(), [v] if v == "Vec")
        || matches!(names.as_slice(), [root, m, v] if (root == "std" || root == "alloc") && m == "vec" && v == "Vec");
    let Some(syn::PathArguments::AngleBracketed(a)) = p.path.segments.last().map(|s| &s.arguments) else {
        return false;
    };
    let u8_only = matches!(
        a.args.iter().collect::<Vec<_>>().as_slice(),
        [syn::GenericArgument::Type(Type::Path(t))] if t.qself.is_none() && t.path.is_ident("u8")
    );
    p.qself.is_none() && std_path && u8_only
}

fn cli_kind(ty: &Type) -> CliKind {
    match last_segment(ty) {
        Some(s) if s.ident == "bool" && s.arguments.is_none() => CliKind::Switch,
        Some(s) if s.ident == "Option" && !s.arguments.is_none() => CliKind::Optional,
        _ => CliKind::Required,
    }
}

/// `Events<…>` (any path ending so, with type arguments): what a stream method returns.
fn is_events(ty: &Type) -> bool {
    last_segment(ty)
        .is_some_and(|s| s.ident == "Events" && matches!(s.arguments, syn::PathArguments::AngleBracketed(_)))
}

fn is_result(ty: &Type) -> bool {
    last_segment(ty).is_some_and(|s| s.ident == "Result")
}

/// The doc comment (lines joined, one leading space dropped) and the other attributes.
fn split_docs(attrs: Vec<Attribute>) -> (String, Vec<Attribute>) {
    let mut lines = Vec::new();
    for attr in &attrs {
        if !attr.path().is_ident("doc") {
            continue;
        }
        if let syn::Meta::NameValue(nv) = &attr.meta {
            if let Expr::Lit(syn::ExprLit { lit: Lit::Str(s), .. }) = &nv.value {
                let v = s.value();
                lines.push(v.strip_prefix(' ').map(str::to_string).unwrap_or(v));
            }
        }
    }
    (lines.join("\n").trim().to_string(), attrs)
}

/// A type as written, without the token printer's spaces: `Result<Vec<u8>, Error>`.
pub fn type_name(ty: &Type) -> String {
    let s = ty.to_token_stream().to_string();
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    for (i, &c) in chars.iter().enumerate() {
        if c == ' ' {
            let prev = i.checked_sub(1).map(|j| chars[j]);
            let next = chars.get(i + 1).copied();
            if prev.is_some_and(|p| "<(&[:".contains(p)) || next.is_some_and(|n| "<>),:;]".contains(n)) {
                continue;
            }
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_are_tidy() {
        let t = |s: &str| type_name(&syn::parse_str::<Type>(s).unwrap());
        assert_eq!(t("Vec<u8>"), "Vec<u8>");
        let bytes = |s: &str| is_byte_vec(&syn::parse_str(s).unwrap());
        for yes in ["Vec<u8>", "std::vec::Vec<u8>", "::alloc::vec::Vec<u8>"] {
            assert!(bytes(yes), "{yes}");
        }
        for no in [
            "Vec<u16>",
            "Vec<std::primitive::u8>",
            "my::Vec<u8>",
            "Vec",
            "Vec<u8, A>",
            "Option<Vec<u8>>",
            "[u8; 4]",
        ] {
            assert!(!bytes(no), "{no}");
        }
        assert_eq!(t("std::result::Result<Vec<u8>, my::Error>"), "std::result::Result<Vec<u8>, my::Error>");
        assert_eq!(t("(u8, [u16; 4])"), "(u8, [u16; 4])");
        assert_eq!(t("Option<HashMap<String, u64>>"), "Option<HashMap<String, u64>>");
    }
}
