//! The client's reconnect and retry policy against
//! `protocol/reconnect-policy.json`, the table PROTOCOL.md §5, §9 and §11
//! refer to: every exact entry, codes across every range, the HTTP
//! statuses, the error codes and the default delays. The TypeScript SDK is
//! checked against the same file (clients/js/test/policy.test.mjs).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use protocol::ErrorCode;
use serde_json::Value;
use switchboard_client::Disconnect;
use switchboard_client::backoff::{
    self, Action, Backoff, BackoffPolicy, Decision, RetryDelay, close_action, error_retry,
    http_action,
};

const POLICY: &str = include_str!("../../protocol/reconnect-policy.json");

fn policy() -> Value {
    serde_json::from_str(POLICY).expect("reconnect-policy.json is JSON")
}

fn action(v: &Value) -> Action {
    match v.as_str().expect("an action") {
        "stop" => Action::Stop,
        "backoff" => Action::Backoff,
        "immediate" => Action::Immediate,
        other => panic!("unknown action `{other}`"),
    }
}

fn u16_of(v: &Value) -> u16 {
    u16::try_from(v.as_u64().expect("a number")).expect("a u16")
}

/// A few codes of `from..=to`: both ends, the middle, and some between.
fn samples(from: u16, to: u16) -> Vec<u16> {
    let span = u32::from(to - from);
    let mut out: Vec<u16> = (0..=8)
        .map(|i| from + u16::try_from(span * i / 8).expect("in range"))
        .collect();
    out.dedup();
    out
}

/// Checks `f` on every exact entry and on samples of every range that no
/// exact entry covers; returns how many values were checked.
fn check_table(table: &Value, key: &str, f: impl Fn(u16) -> Action) -> usize {
    let exact: Vec<(u16, Action)> = table
        .get(if key == "code" { "codes" } else { "statuses" })
        .and_then(Value::as_array)
        .expect("exact entries")
        .iter()
        .map(|e| (u16_of(&e[key]), action(&e["action"])))
        .collect();
    let mut checked = 0;
    for (n, want) in &exact {
        assert_eq!(f(*n), *want, "{key} {n}");
        checked += 1;
    }
    for r in table["ranges"].as_array().expect("ranges") {
        let (from, to, want) = (u16_of(&r["from"]), u16_of(&r["to"]), action(&r["action"]));
        assert!(from <= to, "range {from}-{to}");
        for n in samples(from, to) {
            if exact.iter().any(|(e, _)| *e == n) {
                continue;
            }
            assert_eq!(f(n), want, "{key} {n} (range {from}-{to})");
            checked += 1;
        }
    }
    checked
}

#[test]
fn close_codes_follow_the_table() {
    let p = policy();
    let checked = check_table(&p["close"], "code", close_action);
    assert!(checked > 50, "only {checked} close codes checked");
    // Through the driver's own path too: a close with each code.
    for e in p["close"]["codes"].as_array().expect("codes") {
        let code = u16_of(&e["code"]);
        let reason = Disconnect::Closed {
            code,
            reason: String::new(),
        };
        assert_eq!(
            backoff::classify(&reason).0,
            action(&e["action"]),
            "close {code}"
        );
    }
}

#[test]
fn the_ranges_cover_every_close_code() {
    let p = policy();
    let mut covered = vec![false; 65536];
    for r in p["close"]["ranges"].as_array().expect("ranges") {
        for n in u16_of(&r["from"])..=u16_of(&r["to"]) {
            assert!(!covered[usize::from(n)], "{n} is in two ranges");
            covered[usize::from(n)] = true;
        }
    }
    assert!(covered.iter().all(|c| *c), "a close code is in no range");
}

#[test]
fn http_statuses_follow_the_table() {
    let p = policy();
    let checked = check_table(&p["http"], "status", http_action);
    assert!(checked > 20, "only {checked} statuses checked");
    let after = p["http"]["retry_after_header"]["use"].as_str();
    assert_eq!(after, Some("floor"));
    // A Retry-After on a status that backs off is a floor under the step.
    let mut b = Backoff::seeded(BackoffPolicy::default(), 1);
    let refused = Disconnect::Refused {
        status: 503,
        body: String::new(),
        retry_after: Some(Duration::from_secs(7)),
    };
    assert_eq!(b.next(&refused), Decision::Retry(Duration::from_secs(7)));
}

#[test]
fn a_retry_after_ms_in_a_backoff_close_reason_is_a_floor() {
    let p = policy();
    let r = &p["close"]["retry_after_in_reason"];
    assert_eq!(r["use"].as_str(), Some("floor"));
    let (from, to) = (u16_of(&r["from"]), u16_of(&r["to"]));
    for code in samples(from, to) {
        let reason = Disconnect::Closed {
            code,
            reason: "slow down; retry_after_ms=9000".into(),
        };
        let (_, floor) = backoff::classify(&reason);
        assert_eq!(floor, Some(Duration::from_millis(9000)), "close {code}");
    }
    // Outside the range the reason is not read for a delay.
    let reason = Disconnect::Closed {
        code: 1013,
        reason: "retry_after_ms=9000".into(),
    };
    assert_eq!(backoff::classify(&reason).1, None);
}

#[test]
fn lost_connections_and_version_mismatches_follow_the_table() {
    let p = policy();
    let lost = action(&p["lost"]["action"]);
    let io = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
    let failed = Disconnect::ConnectFailed(std::sync::Arc::new(
        switchboard_client::ConnectError::Tcp(io),
    ));
    assert_eq!(backoff::classify(&failed).0, lost);
    assert_eq!(
        backoff::classify(&Disconnect::Silent(Duration::from_secs(60))).0,
        lost
    );
    let mismatch = Disconnect::ProtocolMismatch {
        server: 2,
        client: protocol::PROTOCOL_VERSION,
    };
    assert_eq!(
        backoff::classify(&mismatch).0,
        action(&p["version_mismatch"]["action"])
    );
    assert_eq!(
        p["protocol"].as_u64(),
        Some(u64::from(protocol::PROTOCOL_VERSION))
    );
}

#[test]
fn error_codes_follow_the_table() {
    let p = policy();
    let entries = p["errors"].as_array().expect("errors");
    for code in ErrorCode::ALL {
        let e = entries
            .iter()
            .find(|e| e["code"].as_str() == Some(code.as_str()))
            .unwrap_or_else(|| panic!("error code {} missing from the policy", code.as_str()));
        let want = match (e["retry"].as_bool(), e["delay"].as_str()) {
            (Some(false), None) => None,
            (Some(true), Some("retry_after_ms")) => Some(RetryDelay::RetryAfter),
            (Some(true), Some("backoff")) => Some(RetryDelay::Backoff),
            other => panic!("bad entry for {}: {other:?}", code.as_str()),
        };
        assert_eq!(error_retry(code), want, "{}", code.as_str());
    }
    assert_eq!(
        entries.len(),
        ErrorCode::ALL.len(),
        "an entry names no code"
    );
}

#[test]
fn default_delays_are_the_tables() {
    let d = &policy()["delays"];
    let ms = |k: &str| Duration::from_millis(d[k].as_u64().expect(k));
    let o = BackoffPolicy::default();
    assert_eq!(o.initial, ms("initial_ms"));
    assert_eq!(o.max, ms("max_ms"));
    assert_eq!(
        u64::from(o.multiplier),
        d["multiplier"].as_u64().expect("multiplier")
    );
    assert_eq!(Some(o.jitter), d["jitter"].as_f64());
    assert_eq!(o.at_once_jitter, ms("immediate_max_ms"));
    // The steps the spec's example lists: 0.5, 1, 2, 4, ... 30 s.
    let steps: Vec<u64> = (0..8).map(|n| o.step(n).as_millis() as u64).collect();
    assert_eq!(steps, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
}
