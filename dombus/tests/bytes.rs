//! `Vec<u8>` arguments and results travel as serde bytes (one copy, not a serializer call per
//! byte), in exactly the encoding of a sequence of `u8`: a peer built either way reads the
//! other's calls and answers.
#![allow(clippy::unwrap_used, missing_docs)]

use dombus::rpc::Request as _;
use dombus::rpc::codec::Codec;
use serde::{Deserialize, Serialize};

/// Blobs.
#[dombus::service(name = "blobs", version = 1)]
pub trait Blobs {
    /// Joins the parts.
    async fn join(&self, head: Vec<u8>, name: String, tail: std::vec::Vec<u8>) -> Vec<u8>;
}

struct Joiner;

impl Blobs for Joiner {
    async fn join(&self, head: Vec<u8>, name: String, tail: Vec<u8>) -> Vec<u8> {
        [head, name.into_bytes(), tail].concat()
    }
}

/// The same arguments with plain `Vec<u8>`s, which serde encodes as a sequence of `u8` each.
#[derive(Serialize, Deserialize)]
struct PlainArgs {
    head: Vec<u8>,
    name: String,
    tail: Vec<u8>,
}

#[tokio::test]
async fn byte_vectors_are_encoded_as_sequences_of_u8_are() {
    let head: Vec<u8> = (0..=255).collect();
    let (name, tail) = ("x".to_string(), vec![7u8; 3000]);
    let joined = [head.clone(), name.clone().into_bytes(), tail.clone()].concat();
    let service = Joiner.into_service();
    for codec in [Codec::Bincode, Codec::Postcard] {
        let plain =
            codec.encode(&PlainArgs { head: head.clone(), name: name.clone(), tail: tail.clone() }).unwrap();
        let call = BlobsRequest::Join { head: head.clone(), name: name.clone(), tail: tail.clone() };
        assert_eq!(call.encode_args(codec).unwrap(), plain, "{codec:?}: the call's arguments");
        // The server reads the plain encoding and answers in it.
        let reply = service.dispatch().dispatch("join", &plain, codec).unwrap().await.unwrap();
        let plain_reply = codec.encode(&joined).unwrap();
        assert_eq!(reply, plain_reply, "{codec:?}: the answer");
        // The client reads a plain answer.
        let BlobsResponse::Join(got) = BlobsRequest::decode_response("join", &plain_reply, codec).unwrap();
        assert_eq!(got, joined);
    }
}
