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

/// The reconnect and retry policy as data, which both clients are tested
/// against (client/tests/policy.rs, clients/js/test/policy.test.mjs).
const POLICY: &str = include_str!("../reconnect-policy.json");

#[allow(clippy::expect_used)]
fn policy() -> Value {
    serde_json::from_str(POLICY).expect("reconnect-policy.json is JSON")
}

/// The rows of the spec's tables whose first cell is a number: (number,
/// second cell, last cell).
#[allow(clippy::expect_used)]
fn numbered_rows(section: &str, next: &str) -> Vec<(u64, String, String)> {
    let start = SPEC.find(section).expect("section");
    let end = start + SPEC[start..].find(next).expect("next section");
    SPEC[start..end]
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l
                .trim()
                .trim_matches('|')
                .split('|')
                .map(str::trim)
                .collect();
            let n = cells.first()?.parse().ok()?;
            Some((n, cells.get(1)?.to_string(), cells.last()?.to_string()))
        })
        .collect()
}

/// The action a "reconnect?" cell of the spec names.
fn action_of(cell: &str) -> &'static str {
    if cell.starts_with("no") {
        "stop"
    } else if cell.contains("at once") {
        "immediate"
    } else if cell.contains("backoff") || cell.contains("after") {
        "backoff"
    } else {
        panic!("unknown reconnect cell `{cell}`")
    }
}

#[test]
fn the_policy_file_is_the_spec_tables() {
    assert!(
        SPEC.contains("protocol/reconnect-policy.json"),
        "PROTOCOL.md does not name the policy file"
    );
    let p = policy();
    assert_eq!(
        p["protocol"].as_u64(),
        Some(u64::from(protocol::PROTOCOL_VERSION))
    );
    let codes = p["close"]["codes"].as_array().expect("codes");
    let action = |code: u64| -> &str {
        codes
            .iter()
            .find(|e| e["code"].as_u64() == Some(code))
            .and_then(|e| e["action"].as_str())
            .unwrap_or_else(|| panic!("close code {code} missing from the policy file"))
    };
    // Every row of §9's two code tables, and every code the server sends.
    let rows = numbered_rows("## 9. Close codes", "## 10. Limits");
    assert!(rows.len() >= 20, "{} close code rows", rows.len());
    for (code, name, cell) in &rows {
        assert_eq!(action(*code), action_of(cell), "close {code} {name}");
    }
    assert_eq!(
        rows.len(),
        codes.len(),
        "the policy file lists codes §9 does not"
    );
    for c in close::ALL {
        let want = match c.reconnect {
            Reconnect::Never => "stop",
            Reconnect::Backoff => "backoff",
            Reconnect::AtOnce => "immediate",
        };
        assert_eq!(action(u64::from(c.code)), want, "close {}", c.name);
    }
    // Every error code, retried as §5's table says.
    let errors = p["errors"].as_array().expect("errors");
    for code in ErrorCode::ALL {
        let e = errors
            .iter()
            .find(|e| e["code"].as_str() == Some(code.as_str()))
            .unwrap_or_else(|| panic!("{} missing from the policy file", code.as_str()));
        let row = SPEC
            .lines()
            .find(|l| l.starts_with(&format!("| `{}` |", code.as_str())))
            .expect("row");
        let cell = row
            .trim_end_matches('|')
            .rsplit('|')
            .next()
            .unwrap_or("")
            .trim();
        let (retry, delay) = (e["retry"].as_bool(), e["delay"].as_str());
        match cell {
            "no" => assert_eq!((retry, delay), (Some(false), None), "{}", code.as_str()),
            "yes, after `retry_after_ms`" => {
                assert_eq!((retry, delay), (Some(true), Some("retry_after_ms")))
            }
            "yes, after a backoff step" => {
                assert_eq!((retry, delay), (Some(true), Some("backoff")))
            }
            other => panic!("{}: unknown retry cell `{other}`", code.as_str()),
        }
    }
    // The §2 refusals the server makes.
    let statuses = p["http"]["statuses"].as_array().expect("statuses");
    for (status, _, _) in numbered_rows("## 2. Connecting", "**With authentication**") {
        assert!(
            statuses
                .iter()
                .any(|e| e["status"].as_u64() == Some(status)),
            "HTTP {status} missing from the policy file"
        );
    }
    // The defaults §11 states.
    let d = &p["delays"];
    for (value, text) in [
        (
            d["initial_ms"].as_u64(),
            "| initial backoff step | 500 ms |",
        ),
        (
            d["max_ms"].as_u64().map(|ms| ms / 1000),
            "| largest step | 30 s |",
        ),
        (
            d["multiplier"].as_u64(),
            "| multiplier per consecutive backoff | 2 |",
        ),
        (
            d["immediate_max_ms"].as_u64(),
            "| largest delay of an immediate reconnect | 1000 ms",
        ),
    ] {
        let number: String = text.chars().filter(char::is_ascii_digit).collect();
        assert_eq!(value.map(|v| v.to_string()), Some(number), "{text}");
        assert!(SPEC.contains(text), "§11 does not say {text}");
    }
    assert_eq!(d["jitter"].as_f64(), Some(0.5));
    assert!(SPEC.contains("| jitter | 0.5:"));
}
