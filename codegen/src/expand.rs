//! The generated code. For a trait `Storage`:
//!
//! * the trait itself, each `async fn` turned into `fn … -> impl Future<Output = …> + Send` (so
//!   that a server can run calls on any thread; implementors still write `async fn`), with
//!   `Send + Sync + 'static` and a provided `into_service()`;
//! * `StorageRequest` / `StorageResponse`: one variant per method (tarpc's shape), which the
//!   CLI glue builds from a command line and tarpc's `Stub` of `dombus::rpc::Client` carries
//!   **by method name**;
//! * `StorageClient(dombus::rpc::Client<StorageRequest>)`: a method per trait method, taking a
//!   tarpc `Context` first, that encodes its arguments, calls the `RawClient` by the method's
//!   name and decodes its own result type (no request or response enum on the way);
//! * in an anonymous `const _` block (so that it sees the trait's scope even inside a function,
//!   and adds no names to it): the argument structs, the client's methods, the server's
//!   dispatch, the wire encoding, the descriptor and, with the `cli` feature (which the `dombus`
//!   crate's `cli` feature turns on), the CLI glue (`dombus::rpc::cli::ServiceCli`).
//!
//! Generated code names everything by absolute path through `::dombus`, and its own locals
//! start with `__` (argument names may not), so user names cannot capture them.

use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::ItemTrait;
use syn::spanned::Spanned;

use crate::model::{CliKind, Options, Service, is_byte_vec};

pub fn expand(attr: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    expand_with(attr, item, cfg!(feature = "cli"))
}

/// The expansion, with the CLI glue or without.
fn expand_with(attr: TokenStream, item: TokenStream, cli: bool) -> syn::Result<TokenStream> {
    let item: ItemTrait = syn::parse2(item)
        .map_err(|e| syn::Error::new(e.span(), format!("#[dombus::service] goes on a trait: {e}")))?;
    // Report a bad option together with the trait's own errors.
    let (options, bad_options) = match Options::parse(attr) {
        Ok(o) => (o, None),
        Err(e) => (Options::default(), Some(e)),
    };
    match (Service::new(item, options), bad_options) {
        (Ok(service), None) => Ok(generate(&service, cli)),
        (Ok(_), Some(e)) | (Err(e), None) => Err(e),
        (Err(mut e), Some(o)) => {
            e.combine(o);
            Err(e)
        }
    }
}

fn generate(s: &Service, cli: bool) -> TokenStream {
    let rpc = quote!(::dombus::rpc);
    let private = quote!(::dombus::__private);
    let tarpc = quote!(#private::tarpc);
    let Service { vis, ident, name, version, doc, attrs, methods } = s;
    let request = format_ident!("{ident}Request");
    let response = format_ident!("{ident}Response");
    let client = format_ident!("{ident}Client");

    let idents: Vec<_> = methods.iter().map(|m| &m.ident).collect();
    let variants: Vec<_> = methods.iter().map(|m| &m.variant).collect();
    let wires: Vec<_> = methods.iter().map(|m| &m.wire).collect();
    let outputs: Vec<_> = methods.iter().map(|m| &m.output).collect();
    // What each method's call answers: its result, or for a stream a batch of events.
    let response_types: Vec<TokenStream> = methods
        .iter()
        .map(|m| {
            let output = &m.output;
            if m.stream { quote!(#rpc::events::BatchOf<#output>) } else { quote!(#output) }
        })
        .collect();
    let streams: Vec<_> = methods.iter().map(|m| m.stream).collect();
    let method_attrs: Vec<_> = methods.iter().map(|m| &m.attrs).collect();
    let arg_idents: Vec<Vec<_>> = methods.iter().map(|m| m.args.iter().map(|a| &a.ident).collect()).collect();
    let arg_types: Vec<Vec<_>> = methods.iter().map(|m| m.args.iter().map(|a| &a.ty).collect()).collect();
    let args_structs: Vec<_> = methods.iter().map(|m| format_ident!("__Args{}", m.variant)).collect();
    let idempotent: Vec<_> = methods.iter().map(|m| m.idempotent).collect();
    // Expressions that need the argument or result types to be serde types, spanned on the
    // method's name or its result type: a non-serde type is reported there, not on the
    // attribute.
    // A `Vec<u8>` result travels as serde bytes (`model::is_byte_vec` says why).
    let encode_results: Vec<_> = methods
        .iter()
        .map(|m| {
            if is_byte_vec(&m.output) {
                quote_spanned!(m.output.span()=> ::dombus::rpc::codec::Codec::encode(
                    __codec,
                    &::dombus::__private::serde_bytes::Bytes::new(&__result),
                ))
            } else {
                quote_spanned!(m.output.span()=> ::dombus::rpc::codec::Codec::encode(__codec, &__result))
            }
        })
        .collect();
    let decode_results: Vec<_> = methods
        .iter()
        .map(|m| {
            if is_byte_vec(&m.output) {
                quote_spanned!(m.output.span()=> ::dombus::rpc::codec::Codec::decode(__codec, __bytes)
                    .map(::dombus::__private::serde_bytes::ByteBuf::into_vec))
            } else {
                quote_spanned!(m.output.span()=> ::dombus::rpc::codec::Codec::decode(__codec, __bytes))
            }
        })
        .collect();
    // Spanned on the method: what serde's derive says about a non-serde argument points there
    // (and at the argument's type), not at the attribute.
    let args_struct_defs: Vec<_> = methods
        .iter()
        .zip(&args_structs)
        .map(|(m, name)| {
            let fields = m.args.iter().map(|a| {
                let (field, ty) = (&a.ident, &a.ty);
                if is_byte_vec(ty) {
                    quote!(#[serde(with = "::dombus::__private::serde_bytes")] #field: #ty)
                } else {
                    quote!(#field: #ty)
                }
            });
            quote_spanned! {m.ident.span()=>
                #[derive(::dombus::__private::serde::Serialize, ::dombus::__private::serde::Deserialize)]
                #[serde(crate = "::dombus::__private::serde")]
                struct #name { #(#fields),* }
            }
        })
        .collect();
    let decode_args: Vec<_> = methods
        .iter()
        .map(|m| quote_spanned!(m.ident.span()=> ::dombus::rpc::codec::Codec::decode(__codec, __args)))
        .collect();

    let client_methods: Vec<TokenStream> = methods
        .iter()
        .zip(&args_structs)
        .zip(&decode_results)
        .map(|((m, args_struct), decode_result)| {
            let (ident, wire, output, attrs, idempotent) = (&m.ident, &m.wire, &m.output, &m.attrs, m.idempotent);
            let (arg_idents, arg_types): (Vec<_>, Vec<_>) = m.args.iter().map(|a| (&a.ident, &a.ty)).unzip();
            if m.stream {
                quote! {
                    #(#attrs)*
                    ///
                    /// A subscription: a stream of updates from the server, resumed from its cursor
                    /// after a failed poll or a new connection.
                    pub fn #ident(&self, #(#arg_idents: #arg_types),*) -> #rpc::events::SubscriptionOf<#output> {
                        let __raw = self.0.raw();
                        let __args = __raw.codec().encode(&#args_struct { #(#arg_idents),* });
                        <#rpc::events::SubscriptionOf<#output>>::new(__raw.clone(), #wire, __args)
                    }
                }
            } else {
                quote! {
                    #(#attrs)*
                    #[allow(clippy::too_many_arguments)] // the trait's arguments, plus the context
                    pub async fn #ident(
                        &self,
                        ctx: #tarpc::context::Context,
                        #(#arg_idents: #arg_types),*
                    ) -> ::core::result::Result<#output, #tarpc::client::RpcError> {
                        let __raw = self.0.raw();
                        let __codec = __raw.codec();
                        let __args = __codec
                            .encode(&#args_struct { #(#arg_idents),* })
                            .map_err(#rpc::wire::unencodable_arguments)?;
                        let __reply = __raw
                            .call(ctx, ::std::borrow::Cow::Borrowed(#wire), __args, #idempotent)
                            .await?;
                        let __bytes: &[u8] = &__reply;
                        #decode_result.map_err(|e| #rpc::wire::undecodable_reply(#wire, e))
                    }
                }
            }
        })
        .collect();
    let dispatch_arms: Vec<TokenStream> = methods
        .iter()
        .zip(&args_structs)
        .zip(decode_args.iter().zip(&encode_results))
        .map(|((m, args_struct), (decode_args, encode_result))| {
            let (method, wire) = (&m.ident, &m.wire);
            let arg_idents: Vec<_> = m.args.iter().map(|a| &a.ident).collect();
            if m.stream {
                quote! {
                    #wire => {
                        let __call: #rpc::events::StreamCall = __codec
                            .decode(__args)
                            .map_err(|e| #rpc::wire::bad_arguments(__SERVICE, #wire, e))?;
                        let __args: &[u8] = &__call.args;
                        let #args_struct { #(#arg_idents),* } = #decode_args
                            .map_err(|e| #rpc::wire::bad_arguments(__SERVICE, #wire, e))?;
                        let __service = ::std::sync::Arc::clone(&self.0);
                        ::core::result::Result::Ok(::std::boxed::Box::pin(async move {
                            let __events = #ident::#method(&*__service, #(#arg_idents),*).await;
                            #rpc::events::serve(__events, __call.poll, __codec).await
                        }))
                    }
                }
            } else {
                quote! {
                    #wire => {
                        let #args_struct { #(#arg_idents),* } = #decode_args
                            .map_err(|e| #rpc::wire::bad_arguments(__SERVICE, #wire, e))?;
                        let __service = ::std::sync::Arc::clone(&self.0);
                        ::core::result::Result::Ok(::std::boxed::Box::pin(async move {
                            let __result = #ident::#method(&*__service, #(#arg_idents),*).await;
                            #encode_result
                                .map_err(|e| #rpc::wire::unencodable_result(__SERVICE, #wire, e))
                        }))
                    }
                }
            }
        })
        .collect();

    let request_doc = format!("A call of [`{ident}`]: one variant per method, with its arguments.");
    let response_doc = format!("What a method of [`{ident}`] returned: one variant per method.");
    let client_doc = format!(
        "A client of [`{ident}`] (service `{name}`): one method per trait method, each taking a call \
         context (deadline) first. `{client}::connect(net, addr)` makes one over any dombus transport."
    );

    let descriptor_methods = methods.iter().map(|m| {
        let (wire, doc, result, idem, stream) = (&m.wire, &m.doc, &m.output_name, m.idempotent, m.stream);
        let args = m.args.iter().map(|a| {
            let (n, t) = (syn::ext::IdentExt::unraw(&a.ident).to_string(), &a.ty_name);
            quote!(#rpc::wire::ArgDescriptor { name: #n.into(), ty: #t.into() })
        });
        quote! {
            #rpc::wire::MethodDescriptor {
                name: #wire.into(),
                args: ::std::vec![#(#args),*],
                result: #result.into(),
                idempotent: #idem,
                stream: #stream,
                doc: #doc.into(),
            }
        }
    });

    let cli_subcommands = methods.iter().map(|m| {
        let (wire, doc) = (&m.wire, &m.doc);
        let specs = m.args.iter().map(|a| {
            let (n, t) = (syn::ext::IdentExt::unraw(&a.ident).to_string(), &a.ty_name);
            let kind = match a.cli {
                CliKind::Required => quote!(Required),
                CliKind::Optional => quote!(Optional),
                CliKind::Switch => quote!(Switch),
            };
            quote!(#rpc::cli::ArgSpec { name: #n, ty: #t, kind: #rpc::cli::ArgKind::#kind })
        });
        if m.stream {
            quote!(.subcommand(#rpc::cli::stream_command(#wire, #doc, &[#(#specs),*])))
        } else {
            quote!(.subcommand(#rpc::cli::method_command(#wire, #doc, &[#(#specs),*])))
        }
    });
    let cli_requests = methods.iter().zip(&args_structs).map(|(m, args_struct)| {
        let (wire, variant) = (&m.wire, &m.variant);
        let fields: Vec<_> = m.args.iter().map(|a| &a.ident).collect();
        let from_stdin = quote_spanned!(m.ident.span()=> ::dombus::rpc::cli::from_stdin(__matches)?);
        let getters = m.args.iter().map(|a| {
            let n = syn::ext::IdentExt::unraw(&a.ident).to_string();
            match a.cli {
                CliKind::Required => quote!(#rpc::cli::required(__matches, #n)?),
                CliKind::Optional => quote!(#rpc::cli::optional(__matches, #n)?),
                CliKind::Switch => quote!(#rpc::cli::switch(__matches, #n)),
            }
        });
        quote! {
            #wire => {
                let __stdin = #from_stdin;
                let #args_struct { #(#fields),* } = match __stdin {
                    ::core::option::Option::Some(__args) => __args,
                    ::core::option::Option::None => #args_struct { #(#fields: #getters),* },
                };
                ::core::result::Result::Ok(#request::#variant { #(#fields),* })
            }
        }
    });
    let cli_outcomes = methods.iter().map(|m| {
        let variant = &m.variant;
        let span = m.output.span();
        let body = if m.returns_result {
            quote! {
                match __result {
                    ::core::result::Result::Ok(__v) => #rpc::cli::Outcome::ok(&__v)?,
                    ::core::result::Result::Err(__e) => {
                        // The error's `Display` if it has one, else its serde form.
                        use #rpc::cli::{ViaDisplay as _, ViaSerde as _};
                        #rpc::cli::Outcome::failed(&__e, (&#rpc::cli::ErrorText(&__e)).text())?
                    }
                }
            }
        } else {
            quote_spanned!(span=> ::dombus::rpc::cli::Outcome::ok(&__result)?)
        };
        quote!(#response::#variant(__result) => ::core::result::Result::Ok(#body))
    });

    let cli_subscribes = methods.iter().zip(&args_structs).filter(|(m, _)| m.stream).map(|(m, args_struct)| {
        let (wire, variant, output) = (&m.wire, &m.variant, &m.output);
        let fields: Vec<_> = m.args.iter().map(|a| &a.ident).collect();
        quote! {
            Self::#variant { #(#fields),* } => {
                let __args = __raw.codec().encode(&#args_struct { #(#fields),* });
                let __subscription = <#rpc::events::SubscriptionOf<#output>>::new(__raw.clone(), #wire, __args);
                ::core::result::Result::Ok(#rpc::cli::updates(__subscription, __from))
            }
        }
    });

    let cli_impl = if cli {
        quote! {
            impl #rpc::cli::ServiceCli for #request {
                fn command() -> #private::clap::Command {
                    #private::clap::Command::new(__SERVICE)
                        .about(#rpc::cli::summary(#doc))
                        .subcommand_required(true)
                        #(#cli_subcommands)*
                }

                fn request(
                    __method: &str,
                    __matches: &#private::clap::ArgMatches,
                ) -> ::core::result::Result<Self, #rpc::cli::CliError> {
                    match __method {
                        #(#cli_requests)*
                        _ => ::core::result::Result::Err(#rpc::cli::CliError::Usage(
                            ::std::format!("{:?} is not a method of {}", __method, __SERVICE),
                        )),
                    }
                }

                fn outcome(__response: #response) -> ::core::result::Result<#rpc::cli::Outcome, #rpc::cli::CliError> {
                    match __response {
                        #(#cli_outcomes,)*
                    }
                }

                fn subscribe(
                    self,
                    __raw: &#rpc::RawClient,
                    __from: ::core::option::Option<#rpc::events::Cursor>,
                ) -> ::core::result::Result<#rpc::cli::Updates, Self> {
                    match self {
                        #(#cli_subscribes)*
                        __other => ::core::result::Result::Err(__other),
                    }
                }
            }
        }
    } else {
        TokenStream::new()
    };

    quote! {
        #(#attrs)*
        #vis trait #ident: ::core::marker::Send + ::core::marker::Sync + 'static {
            #(
                #(#method_attrs)*
                fn #idents(&self, #(#arg_idents: #arg_types),*)
                    -> impl ::core::future::Future<Output = #outputs> + ::core::marker::Send;
            )*

            /// This implementation, ready to serve: `server.serve(&addr, my_impl.into_service())`.
            fn into_service(self) -> #rpc::Service
            where
                Self: ::core::marker::Sized,
            {
                #request::__dombus_into_service(self)
            }
        }

        #[doc = #request_doc]
        #[allow(missing_docs)]
        #vis enum #request {
            #( #variants { #(#arg_idents: #arg_types),* } ),*
        }

        #[doc = #response_doc]
        #[allow(missing_docs)]
        #vis enum #response {
            #( #variants(#response_types) ),*
        }

        #[doc = #client_doc]
        #[derive(Clone, Debug)]
        #vis struct #client(pub #rpc::Client<#request>);

        impl #client {
            /// A client of the service at `addr`, connecting on the first call (and again after a
            /// connection loss).
            pub fn new(net: #rpc::Net, addr: #rpc::Address) -> Self {
                Self::with_config(net, addr, #rpc::ClientConfig::default())
            }

            /// Like `new`, with settings.
            pub fn with_config(net: #rpc::Net, addr: #rpc::Address, config: #rpc::ClientConfig) -> Self {
                #client(#rpc::Client::new(net, addr, config))
            }

            /// A client connected now (within 10 s): a wrong address, a missing service or an
            /// incompatible server is reported here.
            pub async fn connect(net: #rpc::Net, addr: #rpc::Address) -> ::std::io::Result<Self> {
                let timeout = ::std::time::Duration::from_secs(10);
                #rpc::Client::connect(net, addr, #rpc::ClientConfig::default(), timeout).await.map(#client)
            }
        }

        impl ::core::convert::From<#rpc::Client<#request>> for #client {
            fn from(client: #rpc::Client<#request>) -> Self {
                #client(client)
            }
        }

        #[allow(non_camel_case_types, non_upper_case_globals, missing_docs, private_interfaces, private_bounds)]
        const _: () = {
            /// The service's name on the wire.
            const __SERVICE: &str = #name;

            impl #request {
                #[doc(hidden)]
                pub fn __dombus_into_service<T: #ident>(service: T) -> #rpc::Service {
                    #rpc::Service::new(
                        <#request as #rpc::Request>::descriptor(),
                        __Dispatcher(::std::sync::Arc::new(service)),
                    )
                }
            }

            #(#args_struct_defs)*

            impl #client {
                #(#client_methods)*
            }

            /// Runs calls on an implementation.
            struct __Dispatcher<T>(pub ::std::sync::Arc<T>);

            impl<T: #ident> #rpc::Dispatch for __Dispatcher<T> {
                fn dispatch(
                    &self,
                    __method: &str,
                    __args: &[u8],
                    __codec: #rpc::codec::Codec,
                ) -> ::core::result::Result<#rpc::wire::ReplyFuture, #tarpc::ServerError> {
                    match __method {
                        #(#dispatch_arms)*
                        _ => ::core::result::Result::Err(#rpc::wire::unknown_method(__SERVICE, __method)),
                    }
                }
            }
        impl #tarpc::RequestName for #request {
            fn name(&self) -> &str {
                #rpc::Request::method(self)
            }
        }

        impl #rpc::Request for #request {
            type Response = #response;
            const SERVICE: &'static str = __SERVICE;

            fn method(&self) -> &'static str {
                match self {
                    #( Self::#variants { .. } => #wires, )*
                }
            }

            fn idempotent(&self) -> bool {
                match self {
                    #( Self::#variants { .. } => #idempotent, )*
                }
            }

            fn is_stream(&self) -> bool {
                match self {
                    #( Self::#variants { .. } => #streams, )*
                }
            }

            fn encode_args(self, __codec: #rpc::codec::Codec) -> ::std::io::Result<::std::vec::Vec<u8>> {
                match self {
                    #( Self::#variants { #(#arg_idents),* } => __codec.encode(&#args_structs { #(#arg_idents),* }), )*
                }
            }

            fn decode_response(
                __method: &str,
                __bytes: &[u8],
                __codec: #rpc::codec::Codec,
            ) -> ::std::io::Result<#response> {
                match __method {
                    #( #wires => #decode_results.map(#response::#variants), )*
                    _ => ::core::result::Result::Err(::std::io::Error::new(
                        ::std::io::ErrorKind::InvalidInput,
                        ::std::format!("{:?} is not a method of {}", __method, __SERVICE),
                    )),
                }
            }

            fn descriptor() -> #rpc::ServiceDescriptor {
                #rpc::ServiceDescriptor {
                    name: __SERVICE.into(),
                    version: #version,
                    doc: #doc.into(),
                    methods: ::std::vec![#(#descriptor_methods),*],
                }
            }
        }

        #cli_impl

        };

    }
}

/// Expansion snapshots: every change to the generated code shows up in review as a diff of
/// `src/snapshots/*.snap` (`cargo insta review`, or `INSTA_UPDATE=always cargo test -p
/// dombus-codegen` and read the diff).
#[cfg(test)]
mod tests {
    use super::*;

    fn pretty(attr: TokenStream, item: TokenStream) -> String {
        pretty_with(attr, item, true)
    }

    fn pretty_with(attr: TokenStream, item: TokenStream, cli: bool) -> String {
        let tokens = expand_with(attr, item, cli).unwrap_or_else(|e| panic!("{e}"));
        let file: syn::File =
            syn::parse2(tokens).unwrap_or_else(|e| panic!("generated code does not parse: {e}"));
        prettyplease::unparse(&file)
    }

    #[test]
    fn a_service_with_every_kind_of_method() {
        insta::assert_snapshot!(pretty(
            quote!(name = "storage", version = 2),
            quote! {
                /// Disk images.
                pub trait Storage {
                    /// Creates a disk.
                    ///
                    /// Fails if it exists.
                    async fn create(&self, name: String, size: u64, backing: Option<String>, force: bool)
                        -> Result<DiskInfo, StorageError>;
                    /// All disks.
                    #[idempotent]
                    async fn list(&self) -> Vec<DiskInfo>;
                    /// Forgets the cache.
                    async fn r#drop(&self);
                    /// Changes to disks (all, or `name`'s).
                    async fn events(&self, name: Option<String>) -> dombus::Events<DiskEvent, Vec<DiskInfo>>;
                }
            },
        ));
    }

    #[test]
    fn byte_vector_arguments_and_results_travel_as_bytes() {
        let out = pretty_with(
            quote!(),
            quote! {
                /// Blobs.
                pub trait Blobs {
                    /// Stores.
                    async fn put(&self, data: Vec<u8>, name: String, maybe: Option<Vec<u8>>) -> Vec<u8>;
                    /// Lists.
                    async fn list(&self, data: Vec<u16>) -> Option<Vec<u8>>;
                }
            },
            true,
        );
        let flat: String = out.split_whitespace().collect();
        assert!(flat.contains(r#"#[serde(with="::dombus::__private::serde_bytes")]data:Vec<u8>,name:String,maybe:Option<Vec<u8>>"#), "{out}");
        assert!(flat.contains("serde_bytes::Bytes::new(&__result)"), "{out}");
        assert!(flat.contains("serde_bytes::ByteBuf::into_vec"), "{out}");
        // One argument and one result are byte vectors (the result decoded by the client's
        // method and by `decode_response`): nothing else is.
        assert_eq!(flat.matches("serde_bytes").count(), 4, "{out}");
    }

    #[test]
    fn without_the_cli_feature_no_cli_glue() {
        let service = || {
            quote! {
                /// Greets.
                pub trait Hello {
                    /// Says hello.
                    async fn hello(&self, name: String) -> Result<String, Refused>;
                }
            }
        };
        let with = pretty_with(quote!(), service(), true);
        let without = pretty_with(quote!(), service(), false);
        assert!(with.contains("ServiceCli") && with.contains("clap"), "{with}");
        assert!(!without.contains("rpc::cli::") && !without.contains("clap"), "{without}");
        assert!(without.contains("impl ::dombus::rpc::Request for HelloRequest"), "{without}");
    }

    #[test]
    fn a_private_service_with_default_name_and_version() {
        insta::assert_snapshot!(pretty(
            quote!(),
            quote! {
                trait NetworkManager {
                    async fn up(&self, interface: String) -> bool;
                }
            },
        ));
    }
}
