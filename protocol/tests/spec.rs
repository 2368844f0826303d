//! PROTOCOL.md is the spec, and its examples are this test's data: every
//! client example must decode with the server's decoder, every server
//! example must round-trip through the wire types, and every error and
//! close code must be in the spec's tables.

use protocol::close::{self, Reconnect};
use protocol::{ErrorCode, ServerFrame, decode_request};
use serde_json::Value;

const SPEC: &str = include_str!("../PROTOCOL.md");
/// The body depth limit the server uses by default.
const MAX_DEPTH: usize = 32;

/// Every fenced block whose info string starts with `json`: (info, text).
fn blocks() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = SPEC.lines();
    while let Some(line) = lines.next() {
        let Some(info) = line.strip_prefix("```json") else {
            continue;
        };
        let mut text = String::new();
        for l in lines.by_ref() {
            if l.starts_with("```") {
                break;
            }
            text.push_str(l);
            text.push('\n');
        }
        out.push((info.trim().to_owned(), text.trim().to_owned()));
    }
    out
}

#[test]
fn every_example_is_valid() {
    let blocks = blocks();
    let (mut client, mut server, mut invalid) = (0, 0, 0);
    for (info, text) in &blocks {
        let mut words = info.split_whitespace();
        match (words.next(), words.next()) {
            (Some("client"), None) => {
                decode_request(text, MAX_DEPTH)
                    .unwrap_or_else(|e| panic!("client example does not decode: {e}\n{text}"));
                client += 1;
            }
            (Some("client-invalid"), Some(code)) => {
                let e = decode_request(text, MAX_DEPTH).err().unwrap_or_else(|| {
                    panic!("invalid example decodes:\n{text}");
                });
                assert_eq!(e.code.as_str(), code, "{text}");
                invalid += 1;
            }
            (Some("server"), None) => {
                let frame = ServerFrame::from_json(text)
                    .unwrap_or_else(|e| panic!("server example does not decode: {e}\n{text}"));
                let again: Value = serde_json::from_str(&frame.to_json()).expect("json");
                let original: Value = serde_json::from_str(text).expect("json");
                assert_eq!(again, original, "server example does not round-trip");
                server += 1;
            }
            _ => panic!("unknown example kind `json {info}`"),
        }
    }
    assert!(
        client >= 8 && server >= 12 && invalid >= 3,
        "{client} {server} {invalid}"
    );
}

#[test]
fn every_frame_type_has_an_example() {
    let blocks = blocks();
    let types_in = |kind: &str| -> Vec<String> {
        blocks
            .iter()
            .filter(|(info, _)| info == kind)
            .filter_map(|(_, text)| {
                let v: Value = serde_json::from_str(text).ok()?;
                Some(v.get("type")?.as_str()?.to_owned())
            })
            .collect()
    };
    let server = types_in("server");
    for t in [
        "welcome",
        "joined",
        "left",
        "ack",
        "message",
        "history",
        "typing",
        "presence",
        "pong",
        "error",
        "token_expiring",
        "refreshed",
        "members",
    ] {
        assert!(server.iter().any(|s| s == t), "no server example of `{t}`");
    }
    let client = types_in("client");
    for t in [
        "join", "leave", "send", "history", "typing", "ping", "auth", "refresh", "presence",
    ] {
        assert!(client.iter().any(|s| s == t), "no client example of `{t}`");
    }
}

#[test]
fn every_error_code_is_in_the_table() {
    for code in ErrorCode::ALL {
        let row = format!("| `{}` |", code.as_str());
        assert!(
            SPEC.contains(&row),
            "error code {} missing from the table",
            code.as_str()
        );
    }
}

#[test]
fn every_close_code_is_in_the_table_with_its_policy() {
    for c in close::ALL {
        let prefix = format!("| {} | {} |", c.code, c.name);
        let row = SPEC
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("close code {} missing from the table", c.code));
        let reconnect = row
            .trim_end_matches('|')
            .rsplit('|')
            .next()
            .unwrap_or("")
            .trim();
        let ok = match c.reconnect {
            Reconnect::Never => reconnect.starts_with("no"),
            Reconnect::Backoff => reconnect.contains("backoff") || reconnect.contains("after"),
            Reconnect::AtOnce => reconnect.contains("at once"),
        };
        assert!(
            ok,
            "close code {}: table says `{reconnect}`, code says {:?}",
            c.code, c.reconnect
        );
    }
}
