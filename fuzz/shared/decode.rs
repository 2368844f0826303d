//! One client frame through the server's decoder, with the properties that
//! must hold for any input.
//!
//! Shared, via `#[path]`, by the `decode_client` fuzz target
//! (`fuzz/fuzz_targets/decode_client.rs`) and the corpus replay test
//! (`protocol/tests/fuzz_corpus.rs`), so the replay checks exactly what the
//! fuzzer checked. It needs only `protocol` and `serde_json`.

use protocol::{ClientRequest, ErrorCode, ServerFrame, decode_request};
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};

/// The body depth limit the server uses by default (`Config::max_body_depth`;
/// `tests/it/fuzz_corpus.rs` asserts the two agree).
pub const MAX_DEPTH: usize = 32;

/// Treats `data` as the payload of one client text frame, as the server does:
/// bytes that are not UTF-8 never reach the decoder (the WebSocket codec
/// closes the session with 1007 first); UTF-8 text is decoded with
/// [`decode_request`]. A panic anywhere is a failure, and so is an `Err`
/// from here, which names the broken property.
pub fn check(data: &[u8]) -> Result<(), String> {
    let Ok(text) = std::str::from_utf8(data) else {
        return Ok(());
    };
    // Only ever called on bodies by the decoder; it must cope with any text.
    let _ = protocol::nesting_depth(text);
    let tree = serde_json::from_str::<serde_json::Value>(text).ok();
    match decode_request(text, MAX_DEPTH) {
        Ok(request) => {
            // The spec: a frame is one JSON object.
            if tree.as_ref().is_some_and(|t| !t.is_object()) {
                return Err(format!(
                    "a frame that is not an object decodes: {request:?}"
                ));
            }
            // What decodes re-encodes (as a client would send it) to the same request.
            let again = request.to_json();
            match decode_request(&again, MAX_DEPTH) {
                Ok(back) if back == request => {}
                other => {
                    return Err(format!(
                        "decoded request does not round-trip: {request:?} -> {again} -> {other:?}"
                    ));
                }
            }
            // A body the server accepts is delivered verbatim in `message`
            // frames: a client must be able to read those.
            if let ClientRequest::Send { body, .. } = &request.body {
                let frame = format!(
                    r#"{{"type":"message","room":"r","seq":1,"from":"u","ts":1,"body":{}}}"#,
                    body.get()
                );
                if let Err(e) = ServerFrame::from_json(&frame) {
                    return Err(format!(
                        "`send` accepts a body that clients cannot read back ({e}): {}",
                        body.get()
                    ));
                }
            }
            Ok(())
        }
        Err(e) => {
            // The spec: an error echoes `id` when the request carried one that
            // could be read, and never one it did not carry. (Checked only
            // where serde_json's own tree parser reads the frame too.)
            // A frame with two `id`s carries none that can be read.
            if let Some(tree) = &tree {
                let carried = tree.get("id").and_then(serde_json::Value::as_u64);
                let duplicate_id = id_keys(text) > 1;
                match (e.id, carried) {
                    (Some(echoed), Some(given)) if echoed == given => {}
                    (None, None) => {}
                    (None, Some(_)) if duplicate_id => {}
                    (echoed, given) => {
                        return Err(format!(
                            "error echoes id {echoed:?} but the frame carried {given:?}: {e}"
                        ));
                    }
                }
            }
            // The unknown type is echoed cut to 32 characters, escaped (at
            // most 10 bytes each): never the whole of what the peer sent.
            if e.code == ErrorCode::UnknownType && e.message.len() > 400 {
                return Err(format!("unknown_type message is unbounded: {e}"));
            }
            Ok(())
        }
    }
}

/// How many top-level `id` keys a JSON object has (0 for anything else).
fn id_keys(text: &str) -> usize {
    struct Count;
    impl<'de> Visitor<'de> for Count {
        type Value = usize;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<usize, A::Error> {
            let mut n = 0;
            while let Some(key) = map.next_key::<String>()? {
                n += usize::from(key == "id");
                map.next_value::<IgnoredAny>()?;
            }
            Ok(n)
        }
    }
    serde_json::Deserializer::from_str(text)
        .deserialize_map(Count)
        .unwrap_or(0)
}
